"""nano-vllm's throughput workload, drawn exactly as its bench.py draws it, and its memory floor."""

from random import randint, seed

from minivllm import SamplingParams


def nano_vllm_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024):
    """(prompt token id lists, SamplingParams list): with the defaults, 133,966 output tokens."""
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
        for _ in range(num_seqs)
    ]
    return prompts, params


def streamed_bytes(runner) -> tuple[int, int]:
    """(bytes of all the model's weights, bytes of K/V a token across layers) of a ModelRunner: what a decode step
    reads once, and for every token of context."""
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    return weight_bytes, runner.kv_bytes_per_block() // runner.block_size


def decode_floor_bytes(prompt_lens: list[int], output_lens: list[int], kv_bytes_per_token: int, weight_bytes: int):
    """Bytes every decode step must read when all requests run together: each sequence's K/V so far, plus the
    weights once a step. Prefill is left out (it is compute-bound), so this is a floor, not an estimate."""
    kv = 0
    for prompt, output in zip(prompt_lens, output_lens):
        # decode step t (1 .. output-1) attends over prompt + t keys
        steps = output - 1
        kv += steps * prompt + steps * (steps + 1) // 2
    return kv * kv_bytes_per_token + max(output_lens) * weight_bytes
