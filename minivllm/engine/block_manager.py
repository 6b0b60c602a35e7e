"""The paged KV cache's bookkeeping: which blocks each sequence owns, and the prefix cache.

A full block is identified by a chained xxhash of its tokens and every token before it, so two
sequences with the same prefix share those blocks (reference counted). Freed blocks that hold a cached
prefix stay findable until they are reused, oldest freed first (least recently used).
"""

from collections import OrderedDict

import numpy as np
import xxhash

from minivllm.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(token_ids: list[int], prev_hash: int | None) -> int:
    h = xxhash.xxh64()
    if prev_hash is not None:
        h.update(prev_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq must add to hold its computed tokens plus num_tokens more."""
        total = seq.num_computed_tokens + num_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks yet the cached blocks of its longest cached prefix.

        At least one token is always left to compute, since its logits give the next token.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0 and not seq.num_pending_tokens
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt token's logits: none may come from the cache
        for i in range((len(seq) - 1) // self.block_size):
            block_id = self.cached.get(self._block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(self._block_tokens(seq, i)):
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.num_computed_tokens += self.block_size
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Add the blocks seq needs to compute num_tokens more; False, with nothing changed, if too few are free."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Publish the blocks that this step fills, so later sequences (and this step's) can share them.

        Sharing within the step is safe: every layer writes the whole batch's K/V before any attention
        reads it.
        """
        if not self.enable_prefix_caching:
            return
        first = seq.num_computed_tokens // self.block_size
        # a block whose last token is still on the GPU is published when that token arrives (token_arrived)
        last = min(seq.num_computed_tokens + seq.num_scheduled_tokens, len(seq.token_ids)) // self.block_size
        for i in range(first, last):
            self._publish(seq, i)

    def token_arrived(self, seq: Sequence) -> None:
        """seq's newest token reached the host. If it completes a block whose K/V a launched step computes,
        publish that block now: commit() had to leave it, not knowing the token."""
        length = len(seq.token_ids)
        if self.enable_prefix_caching and length % self.block_size == 0 and length <= seq.num_computed_tokens:
            self._publish(seq, length // self.block_size - 1)

    def _publish(self, seq: Sequence, i: int) -> None:
        block = self.blocks[seq.block_table[i]]
        block_hash = self._block_hash(seq, i)
        if block.hash is None and block_hash not in self.cached:
            block.hash, block.token_ids = block_hash, tuple(self._block_tokens(seq, i))
            self.cached[block_hash] = block.block_id

    def unpublish_uncomputed(self, seq: Sequence) -> None:
        """Take seq's blocks past its computed tokens out of the prefix cache: the step that published them
        never ran (it was interrupted), so they hold no K/V."""
        for block_id in seq.block_table[seq.num_computed_tokens // self.block_size :]:
            self._evict(block_id)

    def free_sequence(self, seq: Sequence) -> None:
        """Drop seq's references; its blocks that nobody else uses become free, cached ones findable."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing to find in it: reuse it before any cached block
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def _block_hash(self, seq: Sequence, i: int) -> int:
        """The chain hash of seq's full block i, memoised on the sequence (its tokens never change)."""
        while len(seq.block_hashes) <= i:
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(chain_hash(self._block_tokens(seq, len(seq.block_hashes)), prev))
        return seq.block_hashes[i]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
