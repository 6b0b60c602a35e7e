"""SamplingParams: vLLM's names and defaults, validated when constructed."""

import enum
from dataclasses import dataclass, field


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
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self._check_ranges()
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _check_types(self) -> None:
        ints = {"n": self.n, "top_k": self.top_k, "max_tokens": self.max_tokens, "min_tokens": self.min_tokens}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"SamplingParams.{name} must be an int, got {type(value).__name__} {value!r}")
        floats = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p}
        for name, value in floats.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"SamplingParams.{name} must be a number, got {type(value).__name__} {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise TypeError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.stop, (str, list, tuple, type(None))) or not all(
            isinstance(s, str) for s in ([self.stop] if isinstance(self.stop, str) else self.stop or [])
        ):
            raise TypeError(f"SamplingParams.stop must be a string or a list of strings, got {self.stop!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"SamplingParams.output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        ids = self.stop_token_ids or []
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"SamplingParams.stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")

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
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be at least 1, got {self.max_tokens}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"SamplingParams.seed must fit in a signed 64-bit integer, got {self.seed}")
        if self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if "" in self.stop_strings:
            raise ValueError("SamplingParams.stop must not contain an empty string")
