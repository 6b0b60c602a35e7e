"""What generate() returns: vLLM's RequestOutput, CompletionOutput and Logprob shapes."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)  # a token makes up to 21 of them: slots make each a quarter cheaper to build, and smaller
class Logprob:
    logprob: float  # of the model's raw distribution (log-softmax of the logits before any processing), fp32
    rank: int  # 1 for the most likely token
    decoded_token: str | None = None


# One position's logprobs: the token there (sampled, or the prompt's) and the top k, by token id.
PositionLogprobs = dict[int, Logprob]


def position_logprobs(ids: list[int], logprobs: list[float], decoded: list[str | None], base: int, k: int,
                      rank: int) -> PositionLogprobs:
    """One position's dict from flat columns that hold, from base on, its token (of that rank) then its top k."""
    entry = {ids[base]: Logprob(logprobs[base], rank, decoded[base])}
    for top in range(1, k + 1):
        if ids[base + top] not in entry:  # the position's token may be one of the top k: it keeps its entry
            entry[ids[base + top]] = Logprob(logprobs[base + top], top, decoded[base + top])
    return entry


class FlatLogprobs(Sequence[PositionLogprobs]):
    """A completion's logprobs as vLLM gives them, one {token id: Logprob} a generated token (the sampled token,
    then the top k by rank), kept as flat columns of numbers and strings and made into dicts when read (vLLM's
    FlatLogprobs). As dicts of Logprob objects a token with k = 5 is 7 objects to build on the engine's host
    thread, which live as long as their request and which every full pass of Python's garbage collector traverses
    again; in columns a token is a few list appends, and the collector has nothing to traverse in them."""

    __slots__ = ("k", "ids", "logprobs", "ranks", "decoded")

    def __init__(self, k: int, ids: list[int] | None = None, logprobs: list[float] | None = None,
                 ranks: list[int] | None = None, decoded: list[str | None] | None = None):
        """Empty, or made of the given columns (which it then owns)."""
        self.k = k  # top logprobs a position: each position has k + 1 entries in ids, logprobs and decoded
        self.ids: list[int] = ids if ids is not None else []  # the sampled token's, then the top k's
        self.logprobs: list[float] = logprobs if logprobs is not None else []
        # the sampled token's rank, one a position (the top k's are 1..k)
        self.ranks: list[int] = ranks if ranks is not None else []
        self.decoded: list[str | None] = decoded if decoded is not None else []

    def __reduce__(self):
        # pickled as its columns: the engine-core process sends a stream's new logprobs every step, and the slots'
        # state pickles and unpickles in 1.4 ms a 256-row step against 1.0
        return FlatLogprobs, (self.k, self.ids, self.logprobs, self.ranks, self.decoded)

    def append(self, ids: list[int], logprobs: list[float], rank: int, decoded: list[str | None]) -> None:
        """One more position: the sampled token then the top k, in ids, logprobs and decoded (k + 1 each)."""
        self.ids += ids
        self.logprobs += logprobs
        self.ranks.append(rank)
        self.decoded += decoded

    def extend(self, other: "FlatLogprobs") -> None:
        """Append another's positions (of the same k)."""
        self.ids += other.ids
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        self.decoded += other.decoded

    def __len__(self) -> int:
        return len(self.ranks)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("FlatLogprobs index out of range")
        return position_logprobs(self.ids, self.logprobs, self.decoded, index * (self.k + 1), self.k,
                                 self.ranks[index])

    def __iter__(self) -> Iterator[PositionLogprobs]:
        return (self[i] for i in range(len(self)))

    def take(self, positions: range) -> "FlatLogprobs":
        width = self.k + 1
        if positions.step == 1:  # a stream's new positions: slices of the columns, not an index an entry
            start, stop = positions.start, max(positions.start, positions.stop)
            return FlatLogprobs(self.k, self.ids[start * width : stop * width],
                                self.logprobs[start * width : stop * width], self.ranks[start:stop],
                                self.decoded[start * width : stop * width])
        flat = [p * width + j for p in positions for j in range(width)]
        return FlatLogprobs(self.k, [self.ids[i] for i in flat], [self.logprobs[i] for i in flat],
                            [self.ranks[p] for p in positions], [self.decoded[i] for i in flat])

    def __add__(self, other: "FlatLogprobs") -> "FlatLogprobs":
        if not isinstance(other, FlatLogprobs) or other.k != self.k:
            return NotImplemented
        return FlatLogprobs(self.k, self.ids + other.ids, self.logprobs + other.logprobs, self.ranks + other.ranks,
                            self.decoded + other.decoded)

    def __eq__(self, other: object) -> bool:  # equal to any sequence of the same dicts, a list of them too
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable, as a list

    def __repr__(self) -> str:
        return f"FlatLogprobs({list(self)!r})"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, when logprobs were asked for
    logprobs: FlatLogprobs | None = None  # one {token id: Logprob} a generated token, when asked for
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while it runs
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for eos


@dataclass(slots=True)
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
    # when asked for and all computed: one a prompt token (None for the first); a DELTA stream gives them once
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
