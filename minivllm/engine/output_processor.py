"""RequestOutputs from the engine's per-step deltas (vLLM v1's OutputProcessor).

Each step the engine reports, for each request that progressed, what is new since its last report: a
RequestDelta. This module is the one place that turns deltas into the RequestOutputs a request's output_kind asks
for: in the engine's own process (LLMEngine.step, offline) and in AsyncLLM's front end, which receives the deltas
from the engine-core process. A DELTA output is its delta; a FINAL_ONLY request is reported once, when it finishes,
so its delta is everything; only a CUMULATIVE request keeps what it has been given so far, here.

Deltas are plain tuples: they cross the pipe between the processes every step, and tuples pickle about eight times
faster than NamedTuples (256 requests: 0.07 ms against 0.55).
"""

from dataclasses import dataclass

from minivllm.inputs import ProcessedPrompt
from minivllm.outputs import CompletionOutput, FlatLogprobs, PositionLogprobs, RequestMetrics, RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams

# What one completion gained since its last report:
# (token ids, text, logprobs (None when not asked for), cumulative_logprob, finish_reason, stop_reason)
CompletionDelta = tuple[list[int], str, FlatLogprobs | None, float | None, str | None, int | str | None]

# What one request gained in a step:
# (request id, finished, first_token_time, finished_time, num_cached_tokens,
#  prompt_logprobs (once: in the first delta after all of them are computed, else None),
#  one CompletionDelta a completion, by index)
RequestDelta = tuple[str, bool, float | None, float | None, int, list[PositionLogprobs | None] | None,
                     list[CompletionDelta]]


@dataclass(slots=True)
class RequestState:
    """What a request's outputs need that its deltas do not carry."""

    prompt: ProcessedPrompt
    output_kind: RequestOutputKind
    arrival_time: float
    # CUMULATIVE only: everything given so far, a completion by index
    completions: list[CompletionOutput] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None


class OutputProcessor:
    def __init__(self):
        self.requests: dict[str, RequestState] = {}  # unfinished, by the id the engine reports

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                    arrival_time: float) -> None:
        """Expect deltas for a request (before the engine can report any)."""
        state = RequestState(prompt, params.output_kind, arrival_time)
        if params.output_kind == RequestOutputKind.CUMULATIVE:
            state.completions = [CompletionOutput(index, "", [], logprobs=empty_logprobs(params))
                                 for index in range(params.n)]
        self.requests[request_id] = state

    def discard(self, request_id: str) -> None:
        """Forget a request the engine will never report (it refused it)."""
        self.requests.pop(request_id, None)

    def process(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        """One step's deltas as RequestOutputs; a request that finished is forgotten."""
        return [self.output(delta) for delta in deltas]

    def output(self, delta: RequestDelta) -> RequestOutput:
        request_id, finished, first_token_time, finished_time, num_cached_tokens, prompt_logprobs, completions = delta
        state = self.requests.pop(request_id) if finished else self.requests[request_id]
        if state.completions is None:  # DELTA or FINAL_ONLY: the delta is the output
            outputs = [CompletionOutput(index, text, token_ids, cumulative, logprobs, finish_reason, stop_reason)
                       for index, (token_ids, text, logprobs, cumulative, finish_reason, stop_reason)
                       in enumerate(completions)]
        else:
            if prompt_logprobs is not None:
                state.prompt_logprobs = prompt_logprobs
            prompt_logprobs = state.prompt_logprobs
            outputs = [accumulate(into, completion) for into, completion in zip(state.completions, completions)]
        metrics = RequestMetrics(state.arrival_time, first_token_time, finished_time)
        prompt = state.prompt
        return RequestOutput(request_id, prompt.text, prompt.token_ids, outputs, finished, metrics, prompt_logprobs,
                             num_cached_tokens)


def empty_logprobs(params: SamplingParams) -> FlatLogprobs | None:
    return FlatLogprobs(params.logprobs) if params.logprobs is not None else None


def accumulate(into: CompletionOutput, delta: CompletionDelta) -> CompletionOutput:
    """Add a delta to a cumulative completion; its output now. The token ids are copied, as each output must keep
    its own; the logprobs are not (as vLLM, the cumulative outputs of a completion share them as they grow)."""
    token_ids, text, logprobs, into.cumulative_logprob, into.finish_reason, into.stop_reason = delta
    into.text += text
    into.token_ids += token_ids
    if logprobs is not None:
        into.logprobs.extend(logprobs)
    return CompletionOutput(into.index, into.text, list(into.token_ids), into.cumulative_logprob, into.logprobs,
                            into.finish_reason, into.stop_reason)
