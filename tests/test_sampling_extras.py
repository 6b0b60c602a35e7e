"""vLLM's sampling extras against HF transformers in fp32 on tiny checkpoints: logprobs and prompt logprobs
equal HF's log-softmax; penalties, logit bias and allowed tokens equal a greedy loop over HF's logits, alone and
mixed per request in one batch; and the output options (stop strings kept, no detokenizing, prompt truncation,
max_tokens=None, cached-token counts)."""

import pytest
import torch

from minivllm import SamplingParams
from tests.conftest import LLM, random_prompts, token_prompts, write_checkpoint

FAMILIES = ["qwen3", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path, model = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    return path, model


def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """HF's log-softmax at every position of tokens [len, vocab], fp64 for the comparison."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().log_softmax(-1)


def check_position(entry: dict, reference: torch.Tensor, token: int, k: int) -> None:
    """One position's Logprob dict: the token's logprob and rank, and the top k, against HF's log-softmax."""
    assert token in entry
    assert abs(entry[token].logprob - reference[token].item()) < 1e-4
    assert entry[token].rank == int((reference > reference[token]).sum()) + 1
    top = reference.topk(k)
    ranked = sorted((lp.rank, token_id) for token_id, lp in entry.items() if token_id != token or lp.rank <= k)
    assert [r for r, _ in ranked][:k] == list(range(1, k + 1))
    for rank, token_id in ranked[:k]:
        assert abs(entry[token_id].logprob - top.values[rank - 1].item()) < 1e-4


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=16, async_scheduling=False)])
def test_logprobs_and_prompt_logprobs_equal_hf(checkpoint, engine):
    """Sampled at temperature 1 (so ranks past 1 appear), in chunks of 16 prompt tokens in the second case."""
    path, model = checkpoint
    llm = LLM(path, max_model_len=128, **engine)
    prompts = random_prompts(3, 5, 40, seed=31)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    for prompt, out in zip(prompts, llm.generate(token_prompts(prompts), params, use_tqdm=False)):
        completion = out.outputs[0]
        reference = hf_logprobs(model, prompt + completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids) == 8
        for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            check_position(entry, reference[len(prompt) + i - 1], token, 5)
        expected_sum = sum(reference[len(prompt) + i - 1, t].item() for i, t in enumerate(completion.token_ids))
        assert abs(completion.cumulative_logprob - expected_sum) < 1e-3
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            check_position(out.prompt_logprobs[position], reference[position - 1], prompt[position], 3)


def processed(logits: torch.Tensor, tokens: list[int], num_prompt: int, p: SamplingParams) -> torch.Tensor:
    """vLLM's processing of one row of logits, written out plainly: allowed ids, logit bias, then repetition over
    prompt and output, frequency and presence over output."""
    logits = logits.clone()
    if p.allowed_token_ids is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[p.allowed_token_ids] = 0
        logits += mask
    for token, bias in (p.logit_bias or {}).items():
        logits[token] += bias
    for token in set(tokens):
        if logits[token] > 0:
            logits[token] /= p.repetition_penalty
        else:
            logits[token] *= p.repetition_penalty
    outputs = tokens[num_prompt:]
    for token in set(outputs):
        logits[token] -= p.frequency_penalty * outputs.count(token) + p.presence_penalty
    return logits


def hf_greedy(model, prompt: list[int], p: SamplingParams) -> list[int]:
    tokens = list(prompt)
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1].double()
        tokens.append(int(processed(logits, tokens, len(prompt), p).argmax()))
    return tokens[len(prompt):]


EXTRAS = [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(frequency_penalty=1.5),
    dict(presence_penalty=2.0),
    dict(frequency_penalty=-0.7, presence_penalty=0.9, repetition_penalty=1.3),
    dict(logit_bias={5: 4.0, 17: -100.0, 300: 2.5}),
    dict(allowed_token_ids=[3, 9, 27, 81, 243, 500]),
    dict(),
]


def test_penalties_bias_and_allowed_ids_equal_a_greedy_loop_over_hf_logits(checkpoint):
    """All in one batch, each request its own processing, with async scheduling (a penalised row's newest token is
    still on the GPU when its next step runs) and with the penalties reading a long output history."""
    path, model = checkpoint
    llm = LLM(path, max_model_len=128)
    prompts = random_prompts(len(EXTRAS), 3, 30, seed=32)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **extra) for extra in EXTRAS]
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, p), p
    allowed = set(EXTRAS[6]["allowed_token_ids"])
    assert set(outputs[6].outputs[0].token_ids) <= allowed
    plain = outputs[-1].outputs[0].token_ids
    assert all(out.outputs[0].token_ids != plain for out in outputs[:-1] if out.prompt_token_ids == plain)


def test_penalty_counts_survive_preemption(checkpoint):
    """Few KV blocks for eight penalised requests: sequences are preempted and recomputed, keeping their counts on
    the device; every output still equals the greedy loop."""
    path, model = checkpoint
    llm = LLM(path, max_model_len=64, max_num_seqs=3, num_kv_blocks=7)
    prompts = random_prompts(8, 3, 20, seed=33)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **EXTRAS[i % 5]) for i in range(8)]
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.outputs[0].token_ids == hf_greedy(model, prompt, p), p
    assert not llm.llm_engine.penalty_slots.holders, "finished sequences kept their slots"


def test_penalty_slots_are_taken_back_from_preempted_sequences():
    """Slots go lowest first; a finished sequence's is reused; when none is free, a preempted holder's is taken
    (and it must fill a new one), never a running one's."""
    from minivllm.engine.penalty_slots import PenaltySlots
    from minivllm.engine.sequence import Sequence, SequenceStatus

    seqs = [Sequence([1, 2], SamplingParams(presence_penalty=1.0), None, 64) for _ in range(4)]
    slots = PenaltySlots(2)
    for seq in seqs:
        seq.status = SequenceStatus.RUNNING
    assert slots.take(seqs[0]) and slots.take(seqs[1]) and not slots.take(seqs[0])
    assert [seqs[0].penalty_slot, seqs[1].penalty_slot] == [0, 1]
    slots.release(seqs[0])
    assert seqs[0].penalty_slot is None and slots.take(seqs[2]) and seqs[2].penalty_slot == 0
    seqs[1].status = SequenceStatus.WAITING  # preempted
    assert slots.take(seqs[3]) and seqs[3].penalty_slot == 1 and seqs[1].penalty_slot is None
    seqs[1].status = SequenceStatus.RUNNING  # back, after seqs[2] finished
    slots.release(seqs[2])
    assert slots.take(seqs[1]) and seqs[1].penalty_slot == 0 and slots.num_used == 2


def test_bad_words_are_never_generated(tok_llm):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    [plain] = tok_llm.generate(prompt, greedy, use_tqdm=False)
    tokenizer = tok_llm.get_tokenizer()
    word = tokenizer.decode([plain.outputs[0].token_ids[3]]).strip() or "the"
    [out] = tok_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                    bad_words=[word]), use_tqdm=False)
    banned = {tuple(tokenizer.encode(w, add_special_tokens=False)) for w in (word, " " + word)}
    tokens = out.outputs[0].token_ids
    for ids in banned:
        assert not any(tuple(tokens[i : i + len(ids)]) == ids for i in range(len(tokens))), (word, ids)
    assert tokens[:3] == plain.outputs[0].token_ids[:3]


def test_output_options(tok_llm, llm):
    [reference] = tok_llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    text = reference.outputs[0].text
    stop = text[4:7]
    kept = SamplingParams(temperature=0.0, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    [out] = tok_llm.generate("Once upon a time", kept, use_tqdm=False)
    assert out.outputs[0].text == text[: text.find(stop)] + stop and out.outputs[0].stop_reason == stop
    [raw] = tok_llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, detokenize=False),
                             use_tqdm=False)
    assert raw.outputs[0].text == "" and raw.outputs[0].token_ids == reference.outputs[0].token_ids
    prompt = list(range(2, 42))
    [cut] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=4,
                                                                      truncate_prompt_tokens=10), use_tqdm=False)
    [last] = llm.generate({"prompt_token_ids": prompt[-10:]}, SamplingParams(temperature=0.0, max_tokens=4),
                          use_tqdm=False)
    assert cut.prompt_token_ids == prompt[-10:] and cut.outputs[0].token_ids == last.outputs[0].token_ids
    [long] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=None,
                                                                       ignore_eos=True), use_tqdm=False)
    assert len(prompt) + len(long.outputs[0].token_ids) == llm.max_model_len
    assert long.outputs[0].finish_reason == "length"
    [again] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert again.num_cached_tokens == 32  # two full blocks of 16 from the run before
    params = SamplingParams(logit_bias={1: 2.0}, stop=["x"])
    copy = params.clone()
    copy.logit_bias[1] = 3.0
    assert params.logit_bias == {1: 2.0} and copy.stop == ["x"]


# ----- structured outputs through the engine (the grammar module itself: tests/test_structured_outputs.py) -----
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_outputs_always_conform_in_a_mixed_batch(tok_llm, seed):
    """At temperature 1 with async scheduling, next to unconstrained requests: JSON schema, regex, choice and a
    small grammar each conform whenever the output is not cut by max_tokens."""
    import json
    import re

    from minivllm import StructuredOutputsParams

    kinds = {
        "json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        "regex": StructuredOutputsParams(regex=r"[a-z]{2,6}-[0-9]{1,3}"),
        "choice": StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
        "grammar": StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
    }
    params = [SamplingParams(temperature=1.0, seed=seed * 10 + i, max_tokens=48, structured_outputs=s, min_tokens=2)
              for i, s in enumerate(kinds.values())]
    params.append(SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True))
    outputs = tok_llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    checks = {
        "json": lambda t: set(json.loads(t)) == {"name", "age"} and isinstance(json.loads(t)["age"], int),
        "regex": lambda t: re.fullmatch(r"[a-z]{2,6}-[0-9]{1,3}", t) is not None,
        "choice": lambda t: t in ("yes", "no", "maybe so"),
        "grammar": lambda t: re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", t) is not None,
    }
    finished = 0
    for (kind, check), out in zip(checks.items(), outputs):
        completion = out.outputs[0]
        if completion.finish_reason == "stop":
            finished += 1
            assert check(completion.text), (kind, completion.text)
    assert finished >= 3, [o.outputs[0].finish_reason for o in outputs]
    assert len(outputs[-1].outputs[0].token_ids) == 12


def test_structured_outputs_bad_grammar_is_refused_before_any_work(tok_llm):
    from minivllm import StructuredOutputsParams

    engine = tok_llm.llm_engine
    before = engine.stats.prompt_tokens
    with pytest.raises(ValueError, match="regex"):
        tok_llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="([a-z")),
                         use_tqdm=False)
    with pytest.raises(TypeError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})
    assert engine.stats.prompt_tokens == before and not engine.has_unfinished_requests()


def test_truncation_makes_a_too_long_prompt_fit(llm):
    """As vLLM, truncate_prompt_tokens cuts before the max_model_len check: a prompt too long to run whole runs."""
    prompt = list(range(2, 2 + llm.max_model_len + 20))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2), use_tqdm=False)
    [out] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, truncate_prompt_tokens=30),
                         use_tqdm=False)
    assert out.prompt_token_ids == prompt[-30:] and len(out.outputs[0].token_ids) == 2
