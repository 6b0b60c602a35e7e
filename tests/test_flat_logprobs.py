"""FlatLogprobs reads as vLLM's list of {token id: Logprob} dicts, whatever is done to it on the way to a user."""

import pickle

import pytest

from minivllm.outputs import FlatLogprobs, Logprob


def positions() -> list[tuple[list[int], list[float], int, list[str]]]:
    """(ids, logprobs, rank, decoded) of three positions with k = 2: the sampled token first, then the top 2."""
    return [
        ([7, 7, 3], [-0.1, -0.1, -2.5], 1, ["a", "a", "b"]),  # the sampled token is the top one: one entry for it
        ([9, 4, 7], [-4.0, -0.3, -1.2], 5, ["c", "d", "a"]),
        ([3, 1, 2], [-0.7, -0.5, -0.9], 2, ["b", "e", "f"]),
    ]


def dicts() -> list[dict[int, Logprob]]:
    return [
        {7: Logprob(-0.1, 1, "a"), 3: Logprob(-2.5, 2, "b")},
        {9: Logprob(-4.0, 5, "c"), 4: Logprob(-0.3, 1, "d"), 7: Logprob(-1.2, 2, "a")},
        {3: Logprob(-0.7, 2, "b"), 1: Logprob(-0.5, 1, "e"), 2: Logprob(-0.9, 2, "f")},
    ]


def flat() -> FlatLogprobs:
    logprobs = FlatLogprobs(2)
    for position in positions():
        logprobs.append(*position)
    return logprobs


def test_reads_as_the_dicts_vllm_gives():
    got, want = flat(), dicts()
    assert len(got) == 3 and list(got) == want and got == want
    assert [got[i] for i in range(-3, 0)] == want
    assert list(got[2].keys()) == [3, 1, 2]  # the sampled token first, then by rank
    with pytest.raises(IndexError):
        got[3]


def test_slices_concatenation_and_pickling_keep_every_position():
    got, want = flat(), dicts()
    assert got[1:] == want[1:] and got[::2] == want[::2] and got[5:] == []
    assert isinstance(got[1:], FlatLogprobs)
    assert got[1:2] == want[1:2] and got[2:1] == [] and got[-2:] == want[-2:]
    assert got[:1] + got[1:] == want
    extended = got[:1]
    extended.extend(got[1:])
    assert extended == want and got == want  # a slice is a copy: extending it leaves the original
    assert pickle.loads(pickle.dumps(got)) == want
    assert got != want[:2] and got != want[::-1]
