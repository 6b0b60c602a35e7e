"""The sampler's extras on the GPU against the same code on the CPU (the reference path): logits processors
(penalties from counts on the device, logit bias, allowed ids, bans), logprobs and ranks, the counts after a step,
and the structured-output mask, on random logits of a real vocabulary's width."""

import pytest
import torch

from minivllm.engine.penalty_slots import PenaltySlots
from minivllm.engine.sequence import Sequence
from minivllm.engine.step_inputs import StepInputs
from minivllm.engine.step_message import sampling_rows
from minivllm.layers.penalties import PenaltyCounts
from minivllm.layers.sampler import COLUMNS, process_logits, sample
from minivllm.ops import reference
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


def batch_on(device: torch.device, seqs: list[Sequence]):
    """The seqs' sampling batch staged on device, their penalty slots taken and filled there."""
    for seq in seqs:
        seq.penalty_slot = None
    rows = sampling_rows(seqs, [0], VOCAB, PenaltySlots(len(seqs)))
    columns = {name: torch.tensor(v, dtype=COLUMNS[name][0], device=device) for name, v in rows.used_columns().items()}
    counts = PenaltyCounts(VOCAB, len(seqs), device)
    return StepInputs(8, 8, 1, 16, device).sampling_batch(rows, columns, None, counts)


@pytest.mark.parametrize("every_row_penalised", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_processors_and_logprobs_equal_the_cpu(seed, every_row_penalised):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for extra in PARAMS:
        if every_row_penalised:  # the penalties then apply to the whole batch at once, not to gathered rows
            extra = {"presence_penalty": 0.75, **extra}
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g).tolist()
        seq = Sequence(prompt, SamplingParams(temperature=0.0, max_tokens=500, **extra), None, 4096)
        for token in torch.randint(0, 40, (30,), generator=g).tolist():  # repeats, so counts matter
            seq.append_token(token)
        seqs.append(seq)
    logits = torch.randn(len(seqs), VOCAB, generator=g) * 3
    cpu = batch_on(torch.device("cpu"), seqs)
    gpu = batch_on(torch.device("cuda"), seqs)
    want = process_logits(logits.clone(), cpu)
    got = process_logits(logits.cuda(), gpu).cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert not torch.equal(want, logits), "the processors changed nothing"
    out_cpu, out_gpu = sample(logits.clone(), cpu), sample(logits.cuda(), gpu)
    assert out_gpu.tokens.cpu().tolist() == out_cpu.tokens.tolist()
    torch.testing.assert_close(out_gpu.logprobs.cpu(), out_cpu.logprobs, rtol=1e-5, atol=1e-5)
    assert out_gpu.ranks.cpu().tolist() == out_cpu.ranks.tolist()
    assert out_gpu.logprob_ids.cpu().tolist() == out_cpu.logprob_ids.tolist()
    for batch, out in ((cpu, out_cpu), (gpu, out_gpu)):
        batch.penalties.count_sampled(out.tokens)
    assert torch.equal(gpu.penalties.counts.output_counts.cpu(), cpu.penalties.counts.output_counts)
    penalised = sum(seq.params.has_penalties for seq in seqs)
    assert cpu.penalties.counts.output_counts.sum() == 31 * penalised  # each row's 30 outputs and its sampled token


@pytest.mark.parametrize("seed", range(3))
def test_temperature_draw_with_penalties_equals_the_reference(seed):
    """Every row at a temperature with penalties: the draw applies them in its own pass (csrc/sampler.cu), and its
    tokens are the torch reference's on the same noise. The rows have seen tokens 0..39, whose logits are 10 above
    those of 40..79 (the rest have no mass), so the draw takes a seen token; the penalties (repetition 2, then
    presence 2 on those the row generated) put them at least 7 below, and the draw moves to 40..79."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(6):
        params = SamplingParams(temperature=0.5 + 0.1 * i, max_tokens=500, repetition_penalty=2.0,
                                presence_penalty=2.0, frequency_penalty=0.5 * (i % 2))
        seq = Sequence(torch.randperm(40, generator=g).tolist(), params, None, 4096)  # every one of 0..39
        for token in torch.randint(0, 40, (30,), generator=g).tolist():
            seq.append_token(token)
        seqs.append(seq)
    logits = torch.randn(len(seqs), VOCAB, generator=g) - 30
    logits[:, :40] += 64
    logits[:, 40:80] += 54
    logits = logits.cuda()
    batch = batch_on(torch.device("cuda"), seqs)
    torch.cuda.manual_seed(seed)
    tokens = sample(logits, batch).tokens
    torch.cuda.manual_seed(seed)  # the same draws as sample()'s
    noise = torch.empty_like(logits).exponential_()
    want = reference.sampler_gumbel_argmax(logits, noise, batch.temperatures, *batch.penalties.tables())
    assert tokens.tolist() == want.tolist(), "the fused draw differs from the reference"
    unpenalized = reference.sampler_gumbel_argmax(logits, noise, batch.temperatures)
    assert (unpenalized < 40).all() and ((want >= 40) & (want < 80)).all(), (unpenalized, want)


def test_structured_output_mask_on_the_gpu():
    from transformers import AutoTokenizer

    from minivllm.presets import qwen3_tokenizer_dir
    from minivllm.structured_outputs import GrammarCompiler, GrammarMatcher, StructuredOutputsParams

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(qwen3_tokenizer_dir()), VOCAB)
    seq = Sequence([1, 2, 3], SamplingParams(temperature=0.0), None, 4096)
    seq.grammar = GrammarMatcher(compiler.compile(StructuredOutputsParams(choice=["yes", "no"])))
    plain = Sequence([1, 2, 3], SamplingParams(temperature=0.0), None, 4096)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    cpu, gpu = batch_on(torch.device("cpu"), [seq, plain]), batch_on(torch.device("cuda"), [seq, plain])
    want, got = process_logits(logits.clone(), cpu), process_logits(logits.cuda(), gpu).cpu()
    assert torch.equal(got, want)
    assert 2 <= torch.isfinite(want[0]).sum() <= 8 and torch.isfinite(want[1]).all()  # "y", "yes", "n", "no", ...
