"""OutputProcessor: the engine's per-step deltas made into RequestOutputs, one code path for every output_kind, in
the engine's process (LLMEngine.step) and in AsyncLLM's front end (from the engine-core process's messages)."""

import asyncio
import pickle
from dataclasses import replace

import pytest

from minivllm import RequestOutputKind, SamplingParams
from minivllm.async_llm import RequestStream
from minivllm.engine.output_processor import OutputProcessor

PROMPT = "The quick brown fox"
PARAMS = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def completion_fields(c) -> tuple:
    logprobs = list(c.logprobs) if c.logprobs is not None else None
    return c.index, c.text, list(c.token_ids), c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason


def concatenated(deltas: list) -> list[tuple]:
    """A DELTA stream's outputs joined, a completion by index, as CompletionOutput fields."""
    joined = []
    for index in range(len(deltas[0].outputs)):
        parts = [out.outputs[index] for out in deltas]
        logprobs = [entry for c in parts for entry in c.logprobs] if parts[0].logprobs is not None else None
        last = parts[-1]
        joined.append((index, "".join(c.text for c in parts), [t for c in parts for t in c.token_ids],
                       last.cumulative_logprob, logprobs, last.finish_reason, last.stop_reason))
    return joined


def run_kinds(engine, params: SamplingParams) -> dict[RequestOutputKind, list]:
    """The same request as each output kind, side by side in one engine; each one's outputs."""
    seen = {kind: [] for kind in RequestOutputKind}
    for kind in RequestOutputKind:
        engine.add_request(kind.name, PROMPT, replace(params, output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[RequestOutputKind[out.request_id]].append(out)
    return seen


def test_every_output_kind_agrees(tok_llm):
    """Each cumulative output is the deltas so far joined (n = 2, logprobs, cumulative_logprob), the last one the
    FINAL_ONLY output; prompt logprobs come in the first delta only (as vLLM pops them) and in every cumulative
    output; each cumulative output keeps its own token ids."""
    seen = run_kinds(tok_llm.llm_engine, PARAMS)
    cumulative, deltas, [final] = (seen[RequestOutputKind.CUMULATIVE], seen[RequestOutputKind.DELTA],
                                   seen[RequestOutputKind.FINAL_ONLY])
    assert len(cumulative) == len(deltas) == PARAMS.max_tokens
    for step, out in enumerate(cumulative):  # (its logprobs grow with it, as vLLM's: compared at the end)
        so_far = concatenated(deltas[: step + 1])
        assert [(c.text, c.token_ids) for c in out.outputs] == [(text, ids) for _, text, ids, *_ in so_far]
        assert out.finished == (step == len(cumulative) - 1) == deltas[step].finished
    assert [completion_fields(c) for c in cumulative[-1].outputs] == concatenated(deltas)
    assert [completion_fields(c) for c in final.outputs] == concatenated(deltas)
    assert final.outputs[0].token_ids != final.outputs[1].token_ids  # the completions really differ
    assert final.prompt_logprobs is not None and final.prompt_logprobs[0] is None
    assert deltas[0].prompt_logprobs == final.prompt_logprobs and all(o.prompt_logprobs is None for o in deltas[1:])
    assert all(o.prompt_logprobs == final.prompt_logprobs for o in cumulative)
    for outs in cumulative, deltas, [final]:
        first = outs[0].metrics
        assert all(o.prompt == PROMPT and o.metrics.arrival_time == first.arrival_time for o in outs)
        assert all(o.metrics.first_token_time == first.first_token_time is not None for o in outs)
        assert [o.metrics.finished_time is not None for o in outs] == [o.finished for o in outs]


def captured_deltas(engine, params: SamplingParams) -> list:
    """Every delta of one request, as the engine-core process would send them."""
    engine.add_request("captured", PROMPT, params)
    deltas = []
    while engine.has_unfinished_requests():
        step = engine.step_deltas()
        engine.output_processor.process(step)  # keeps the engine's own processor in step with it
        deltas += step
    return deltas


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_lagging_delta_stream_merges_to_the_cumulative_output(tok_llm, logprobs):
    """The same deltas, assembled as DELTA and merged as a consumer that lags gets them (RequestStream.put), make
    the CUMULATIVE output at every step, prompt logprobs (sent once) included. The deltas are plain data."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=logprobs, prompt_logprobs=1)
    deltas = captured_deltas(tok_llm.llm_engine, params)
    # after the first (which carries the prompt logprobs' Logprob objects)
    assert len(deltas) == 8 and (logprobs is not None or b"minivllm" not in pickle.dumps(deltas[1:]))
    processor, prompt = OutputProcessor(), tok_llm.llm_engine.inputs.process(PROMPT, None)
    for kind in RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE:
        processor.add_request(kind.name, prompt, replace(params, output_kind=kind), 0.0)
    stream = RequestStream("lagging", "DELTA", asyncio.new_event_loop(), delta=True)
    for delta in pickle.loads(pickle.dumps(deltas)):
        [merged_in] = processor.process([("DELTA", *delta[1:])])
        [cumulative] = processor.process([("CUMULATIVE", *delta[1:])])
        stream.put(merged_in)
        merged = stream.pending
        assert [completion_fields(c) for c in merged.outputs] == [completion_fields(c) for c in cumulative.outputs]
        assert merged.prompt_logprobs == cumulative.prompt_logprobs is not None
        assert (merged.finished, merged.metrics) == (cumulative.finished, cumulative.metrics)
    assert cumulative.finished and not processor.requests  # finished requests are forgotten
