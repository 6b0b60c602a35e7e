"""SamplingParams: vLLM's names and defaults, validated when constructed."""

import copy
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minivllm.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs: top logprobs a request may ask for


class RequestOutputKind(enum.Enum):
    """What a request's outputs hold while it runs (vLLM's names): everything so far, what is new since the last
    output, or nothing until it finishes (what LLM.generate asks for)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # a per-request generator: same seed, same tokens, whatever else is batched
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted from it as many times as it was generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # never generated (each with and without a leading space)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # with each token, its logprob and the top `logprobs` of the raw distribution
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # the only tokens that may be generated
    detokenize: bool = True  # False: no text, only token ids
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # slow tokenizers only (as in vLLM, fast ones ignore it)
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens
    structured_outputs: "StructuredOutputsParams | None" = None  # the output follows a JSON schema, regex, ...
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        self.validate()
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    def validate(self) -> None:
        """Every field's type and range; run again when a request is added, so a changed field is caught there."""
        self._check_types()
        self._check_ranges()

    def _check_types(self) -> None:
        ints = {"n": self.n, "top_k": self.top_k, "min_tokens": self.min_tokens}
        optional_ints = {"max_tokens": self.max_tokens, "seed": self.seed, "logprobs": self.logprobs,
                         "prompt_logprobs": self.prompt_logprobs, "truncate_prompt_tokens": self.truncate_prompt_tokens}
        for name, value in {**ints, **optional_ints}.items():
            if (value is not None or name in ints) and (not isinstance(value, int) or isinstance(value, bool)):
                kind = "an int" if name in ints else "an int or None"
                raise TypeError(f"SamplingParams.{name} must be {kind}, got {type(value).__name__} {value!r}")
        floats = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty}
        for name, value in floats.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"SamplingParams.{name} must be a number, got {type(value).__name__} {value!r}")
        for name in ("stop", "bad_words"):
            value = getattr(self, name)
            if not isinstance(value, (str, list, tuple, type(None))) or not all(
                isinstance(s, str) for s in ([value] if isinstance(value, str) else value or [])
            ) or (name == "bad_words" and isinstance(value, str)):
                raise TypeError(f"SamplingParams.{name} must be a list of strings, got {value!r}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple, type(None))) or not all(is_int(t) for t in ids or []):
                raise TypeError(f"SamplingParams.{name} must be a list of ints, got {ids!r}")
        bias = self.logit_bias
        if bias is not None and (not isinstance(bias, dict) or not all(
                is_int(k) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in bias.items())):
            raise TypeError(f"SamplingParams.logit_bias must be a dict of token id -> number, got {bias!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")
        if self.structured_outputs is not None:
            from minivllm.structured_outputs import StructuredOutputsParams  # only now: it imports xgrammar

            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise TypeError("SamplingParams.structured_outputs must be a StructuredOutputsParams, got "
                                f"{type(self.structured_outputs).__name__}")
            self.structured_outputs.validate()
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"SamplingParams.output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be at least 1, got {self.n}")
        if not 0 <= self.temperature < float("inf"):  # NaN fails every comparison
            raise ValueError(f"SamplingParams.temperature must be finite, >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or a positive int, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be at least 1 (or None), got {self.max_tokens}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"SamplingParams.seed must fit in a signed 64-bit integer, got {self.seed}")
        if self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.{name} must be in [0, {MAX_LOGPROBS}] (or None), got {value}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"SamplingParams.truncate_prompt_tokens must be at least 1, got "
                             f"{self.truncate_prompt_tokens}")
        if "" in self.stop_strings:
            raise ValueError("SamplingParams.stop must not contain an empty string")
        if not self.detokenize and self.stop_strings:
            raise ValueError("SamplingParams.stop needs detokenize=True: stop strings are found in the text")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("SamplingParams.allowed_token_ids must not be empty (None allows every token)")


def __getattr__(name: str):
    """StructuredOutputsParams where vLLM has it (vllm.sampling_params), loaded on first use: it imports xgrammar."""
    if name == "StructuredOutputsParams":
        from minivllm.structured_outputs import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
