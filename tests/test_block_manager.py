"""BlockManager invariants under random operations (hypothesis), prefix hits and least-recently-used reuse."""

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from minivllm.engine.block_manager import BlockManager, chain_hash
from minivllm.engine.sequence import Sequence
from minivllm.sampling_params import SamplingParams


def check_block_manager(bm: BlockManager, holders: list[Sequence]) -> None:
    """Ref counts equal the holders of each block; free and held blocks partition all; the hash map agrees."""
    held = Counter(block_id for seq in holders for block_id in seq.block_table)
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table), f"seq {seq.seq_id} holds a block twice"
    for block in bm.blocks:
        assert block.ref_count == held.get(block.block_id, 0), f"block {block.block_id} ref count is off"
    free = set(bm.free)
    assert len(free) == len(bm.free)
    assert free.isdisjoint(held) and free | set(held) == set(range(len(bm.blocks)))
    for block_hash, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == block_hash
    hashed = {block.block_id for block in bm.blocks if block.hash is not None}
    assert hashed == set(bm.cached.values())
    for block_id in hashed:
        block = bm.blocks[block_id]
        assert len(block.token_ids) == bm.block_size
    # a hashed block a sequence holds at index i holds exactly that sequence's block i
    for seq in holders:
        for i, block_id in enumerate(seq.block_table):
            block = bm.blocks[block_id]
            if block.hash is not None and (i + 1) * bm.block_size <= min(seq.num_computed_tokens, len(seq.token_ids)):
                assert block.token_ids == tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size])
                prev = None
                for j in range(i + 1):
                    prev = chain_hash(seq.token_ids[j * bm.block_size : (j + 1) * bm.block_size], prev)
                assert block.hash == prev


def new_seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=1000), None, 10**6)


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> bool:
    """What the scheduler does for one chunk: reserve, publish, then mark the tokens computed."""
    if not bm.reserve(seq, num_tokens):
        return False
    seq.num_scheduled_tokens = num_tokens
    bm.commit(seq)
    seq.num_computed_tokens += num_tokens
    seq.num_scheduled_tokens = 0
    return True


operations = st.lists(
    st.tuples(st.sampled_from(["add", "step", "grow", "free"]), st.integers(0, 2**16)), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(4, 24), st.sampled_from([1, 2, 4]), st.booleans())
def test_random_operations_keep_invariants(ops, num_blocks, block_size, caching):
    bm = BlockManager(num_blocks, block_size, caching)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2]]
    live: list[Sequence] = []
    for op, r in ops:
        rng = random.Random(r)
        if op == "add":
            tokens = rng.choice(prefixes)[: rng.randint(0, 8)] + [rng.randrange(20) for _ in range(rng.randint(1, 8))]
            seq = new_seq(tokens)
            bm.match_prefix(seq)
            assert seq.num_computed_tokens < len(seq)
            assert seq.num_computed_tokens % block_size == 0
            if compute(bm, seq, seq.num_uncomputed_tokens):
                live.append(seq)
            else:
                assert len(seq.block_table) == seq.num_computed_tokens // block_size  # reserve changed nothing
                bm.free_sequence(seq)
        elif op == "step" and live:
            seq = rng.choice(live)
            seq.token_ids.append(rng.randrange(20))
            if not compute(bm, seq, 1):
                live.remove(seq)
                bm.free_sequence(seq)  # preempted
        elif op == "grow" and live:
            seq = rng.choice(live)
            seq.token_ids.extend(rng.randrange(20) for _ in range(rng.randint(1, 6)))
            if not compute(bm, seq, seq.num_uncomputed_tokens):
                live.remove(seq)
                bm.free_sequence(seq)
        elif op == "free" and live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free_sequence(seq)
            assert seq.block_table == [] and seq.num_computed_tokens == 0
        check_block_manager(bm, live)
    for seq in live:
        bm.free_sequence(seq)
    check_block_manager(bm, [])
    assert bm.num_free_blocks == num_blocks


def test_prefix_hits_share_blocks_and_leave_one_token():
    bm = BlockManager(16, 4)
    a = new_seq(list(range(10)))
    bm.match_prefix(a)
    assert a.num_computed_tokens == 0
    assert compute(bm, a, 10)
    b = new_seq(list(range(10)) + [99])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    same = new_seq(list(range(8)))  # exactly two full blocks: the last one is recomputed for its logits
    bm.match_prefix(same)
    assert same.block_table == a.block_table[:1] and same.num_computed_tokens == 4
    check_block_manager(bm, [a, b, same])
    other = new_seq([0, 1, 2, 5, 4, 5, 6, 7, 8])  # differs in block 0: no hit
    bm.match_prefix(other)
    assert other.block_table == []


def test_no_hits_without_prefix_caching():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    a = new_seq(list(range(10)))
    assert compute(bm, a, 10)
    b = new_seq(list(range(10)))
    bm.match_prefix(b)
    assert b.block_table == [] and not bm.cached


def test_freed_cached_blocks_stay_findable_and_are_reused_last():
    bm = BlockManager(6, 4)
    a = new_seq(list(range(9)))  # blocks: 2 full (cached) + 1 partial
    assert compute(bm, a, 9)
    cached_blocks = a.block_table[:2]
    bm.free_sequence(a)
    # new blocks come from never-cached free blocks first
    c = new_seq([50 + i for i in range(12)])
    assert compute(bm, c, 12)
    assert not set(c.block_table) & set(cached_blocks)
    b = new_seq(list(range(9)))
    bm.match_prefix(b)
    assert b.block_table == cached_blocks and b.num_computed_tokens == 8
    check_block_manager(bm, [b, c])


def test_least_recently_freed_cached_block_is_evicted_first():
    bm = BlockManager(4, 2)
    first, second = new_seq([1, 2, 3]), new_seq([4, 5, 6])
    assert compute(bm, first, 3) and compute(bm, second, 3)
    bm.free_sequence(first)
    bm.free_sequence(second)
    filler = new_seq([7, 8, 9])  # two blocks: the two uncached partial blocks
    assert compute(bm, filler, 3)
    check_block_manager(bm, [filler])
    extra = new_seq([10])
    assert compute(bm, extra, 1)  # takes the cached block freed first
    hit = new_seq([4, 5, 0])
    bm.match_prefix(hit)
    assert hit.num_computed_tokens == 2, "the more recently freed cached block should survive"
    miss = new_seq([1, 2, 0])
    bm.match_prefix(miss)
    assert miss.num_computed_tokens == 0


def test_reserve_fails_without_changing_anything():
    bm = BlockManager(3, 4)
    a = new_seq(list(range(10)))
    assert compute(bm, a, 10)
    b = new_seq(list(range(20, 30)))
    assert not bm.reserve(b, 10)
    assert b.block_table == [] and bm.num_free_blocks == 0
    check_block_manager(bm, [a])
