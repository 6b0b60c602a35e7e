"""The sampler's extras on the GPU against the same code on the CPU (the reference path): logits processors
(penalties with a token still on the GPU, logit bias, allowed ids, bans), logprobs and ranks, and the
structured-output mask, on random logits of a real vocabulary's width."""

import pytest
import torch

from minivllm.engine.sequence import Sequence
from minivllm.engine.step_inputs import StepInputs
from minivllm.engine.step_message import sampling_rows
from minivllm.layers.sampler import COLUMNS, process_logits, sample
from minivllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 151936
PARAMS = [
    dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
    dict(logit_bias={5: 3.0, 77: -2.0}, logprobs=5),
    dict(allowed_token_ids=[1, 2, 3, 1000, 150000], logprobs=0),
    dict(min_tokens=50, stop_token_ids=[9, 10]),
    dict(),
]


def batch_on(device: torch.device, seqs: list[Sequence], previous: torch.Tensor):
    """The seqs' sampling batch staged on device; every sequence's newest token is still 'on the GPU' (in
    previous, row for row), as under async scheduling."""
    rows = sampling_rows(seqs, [0], VOCAB, {seq.seq_id: i for i, seq in enumerate(seqs)})
    columns = {name: torch.tensor(v, dtype=COLUMNS[name][0], device=device) for name, v in rows.used_columns().items()}
    return StepInputs(8, 8, 1, 16, device).sampling_batch(rows, columns, previous.to(device), None)


@pytest.mark.parametrize("seed", range(3))
def test_processors_and_logprobs_equal_the_cpu(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for extra in PARAMS:
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
        seq = Sequence(prompt, SamplingParams(temperature=0.0, max_tokens=500, **extra), None, 4096)
        for token in torch.randint(0, 40, (30,), generator=g).tolist():  # repeats, so counts matter
            seq.append_token(token)
        seq.num_pending_tokens = 1
        seqs.append(seq)
    previous = torch.randint(0, 40, (len(seqs),), generator=g)
    logits = torch.randn(len(seqs), VOCAB, generator=g) * 3
    cpu = batch_on(torch.device("cpu"), seqs, previous)
    gpu = batch_on(torch.device("cuda"), seqs, previous)
    want = process_logits(logits.clone(), cpu)
    got = process_logits(logits.cuda(), gpu).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, logits), "the processors changed nothing"
    out_cpu, out_gpu = sample(logits.clone(), cpu), sample(logits.cuda(), gpu)
    assert out_gpu.tokens.cpu().tolist() == out_cpu.tokens.tolist()
    torch.testing.assert_close(out_gpu.sampled_logprobs.cpu(), out_cpu.sampled_logprobs, rtol=1e-5, atol=1e-5)
    assert out_gpu.sampled_ranks.cpu().tolist() == out_cpu.sampled_ranks.tolist()
    assert out_gpu.top_ids.cpu().tolist() == out_cpu.top_ids.tolist()


def test_structured_output_mask_on_the_gpu():
    from transformers import AutoTokenizer

    from minivllm.presets import qwen3_tokenizer_dir
    from minivllm.structured_outputs import GrammarCompiler, GrammarMatcher, StructuredOutputsParams

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()), VOCAB)
    seq = Sequence([1, 2, 3], SamplingParams(temperature=0.0), None, 4096)
    seq.grammar = GrammarMatcher(compiler.compile(StructuredOutputsParams(choice=["yes", "no"])))
    plain = Sequence([1, 2, 3], SamplingParams(temperature=0.0), None, 4096)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    cpu = batch_on(torch.device("cpu"), [seq, plain], torch.zeros(2, dtype=torch.int64))
    gpu = batch_on(torch.device("cuda"), [seq, plain], torch.zeros(2, dtype=torch.int64))
    want, got = process_logits(logits.clone(), cpu), process_logits(logits.cuda(), gpu).cpu()
    assert torch.equal(got, want)
    assert 2 <= torch.isfinite(want[0]).sum() <= 8 and torch.isfinite(want[1]).all()  # "y", "yes", "n", "no", ...
