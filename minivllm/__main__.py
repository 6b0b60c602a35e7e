"""The offline demo: `python -m minivllm` runs the main job (60 chat prompts x 256 tokens on the Qwen3-0.6B
preset) on the GPU when there is one, else on the CPU, and prints a few completions and the throughput."""

import argparse
import time

from minivllm import LLM, SamplingParams

BASE_PROMPTS = [
    "Introduce yourself in a few sentences.",
    "List all prime numbers within 100, and explain how you found them.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b", help="checkpoint dir, cached repo id or preset")
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    conversations = [
        [{"role": "user", "content": BASE_PROMPTS[i % len(BASE_PROMPTS)]}] for i in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start

    for output in outputs[:2]:
        print(f"\n--- prompt: {output.prompt!r}\n--- completion: {output.outputs[0].text!r}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    device = llm.config.device
    print(f"\nmain job: {len(outputs)} prompts, {num_tokens} output tokens in {elapsed:.2f} s on {device}: "
          f"{num_tokens / elapsed:.0f} output tokens/s")


if __name__ == "__main__":
    main()
