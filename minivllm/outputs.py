"""What generate() returns: vLLM's RequestOutput, CompletionOutput and Logprob shapes."""

from dataclasses import dataclass, field


@dataclass(slots=True)  # a token makes up to 21 of them: slots make each a quarter cheaper to build, and smaller
class Logprob:
    logprob: float  # of the model's raw distribution (log-softmax of the logits before any processing), fp32
    rank: int  # 1 for the most likely token
    decoded_token: str | None = None


# One position's logprobs: the token there (sampled, or the prompt's) and the top k, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, when logprobs were asked for
    logprobs: list[PositionLogprobs] | None = None  # one a generated token, when asked for
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while it runs
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for eos


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default=None)  # type: ignore[assignment]
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # None for the first token, when asked for
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
