"""The offline demo: `python -m minivllm` runs the main job (60 chat prompts x 256 tokens on the Qwen3-0.6B
preset) on the GPU when there is one, else on the CPU, and prints a few completions and the throughput.
`--prompt TEXT` (repeatable) runs your own text instead. `python -m minivllm serve MODEL ...` runs the
OpenAI-compatible server instead (`minivllm serve --help`), `python -m minivllm run-batch ...` an OpenAI batch file
(`minivllm run-batch --help`)."""

import argparse
import sys
import time

from minivllm.entrypoints.cli import positive_int

BASE_PROMPTS = [
    "Introduce yourself in a few sentences.",
    "List all prime numbers within 100, and explain how you found them.",
]
DEFAULT_NUM_PROMPTS = 60


def parser() -> argparse.ArgumentParser:
    # every default shows in --help; where None stands for a rule, the help says it (`%(default).0s` prints
    # nothing, and stops the formatter from adding "(default: None)")
    p = argparse.ArgumentParser(prog="python -m minivllm", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="checkpoint dir, cached repo id or preset")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt of your own (repeat for several) (default: the demo's two)%(default).0s")
    p.add_argument("--num-prompts", type=positive_int, default=None, metavar="N",
                   help=f"prompts to run, cycling through them (default: {DEFAULT_NUM_PROMPTS}, or one per --prompt)"
                   "%(default).0s")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="N", help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the model's chat template (--no-chat: complete the raw text)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)%(default).0s")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["serve"], ["run-batch"]):
        from minivllm.entrypoints.cli import main as cli_main

        return cli_main(argv)
    args = parser().parse_args(argv)
    from minivllm import LLM, SamplingParams  # after parsing: --help and bad flags answer at once

    texts = args.prompt or BASE_PROMPTS
    num_prompts = args.num_prompts or (len(args.prompt) if args.prompt else DEFAULT_NUM_PROMPTS)
    prompts = [texts[i % len(texts)] for i in range(num_prompts)]
    try:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)  # checked before loading
        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        start = time.perf_counter()
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": text}] for text in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
    except (ValueError, TypeError) as e:  # bad input, said in one line: no traceback for a user's mistake
        print(f"python -m minivllm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    for output in outputs if args.prompt else outputs[:2]:
        print(f"\n--- prompt: {output.prompt!r}\n--- completion: {output.outputs[0].text!r}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\nmain job: {len(outputs)} prompts, {num_tokens} output tokens in {elapsed:.2f} s on "
          f"{llm.config.device}: {num_tokens / elapsed:.0f} output tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
