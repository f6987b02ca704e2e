"""The leader's KV block allocator: the only place block ids are handed out.

Blocks form a pool (after vLLM's `block_pool.py`): each has a reference count; blocks no
sequence references sit in a free queue in least-recently-freed order. A full block whose
tokens are all computed is registered under a hash chained over the whole prefix, so a later
sequence with the same prefix reuses it. A free block keeps its hash (it is still a valid
cache entry) until it is taken for new data: that is the LRU eviction.

Block ids run from 1 to num_blocks: block 0 is the KV pool's reserved null block (padding
rows of CUDA-graph buckets point at it), so it is never handed out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq

import numpy as np


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    """128-bit hash of a full block, chained over every block before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class KVBlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Indexed by block id; entry 0 (the null block) stays unused.
        self.ref_counts = [0] * (num_blocks + 1)
        self.hash_of: list[bytes | None] = [None] * (num_blocks + 1)
        self.block_of_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks + 1))
        self.tables: dict[int, list[int]] = {}
        self.chains: dict[int, list[bytes]] = {}  # hashes of each sequence's full blocks
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of which found in the cache

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self.tables[seq_id]

    # ---- allocation ----------------------------------------------------------------
    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if (h := self.hash_of[block]) is not None:  # evict its cache entry
            self.hash_of[block] = None
            if self.block_of_hash.get(h) == block:
                del self.block_of_hash[h]
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def allocate_prefix(self, seq_id: int, token_ids: Seq[int], reuse: bool = True) -> int:
        """Start `seq_id`'s block table, reusing cached blocks of its longest cached prefix
        (unless `reuse` is False).

        Returns the number of tokens whose KV is already present. At least one token is
        always left to compute, since the last token's logits are needed.
        """
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        table: list[int] = []
        chain: list[bytes] = []
        if self.enable_prefix_caching and reuse:
            bs, parent = self.block_size, b""
            max_blocks = (len(token_ids) - 1) // bs
            self.prefix_queries += max_blocks
            for i in range(max_blocks):
                h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
                block = self.block_of_hash.get(h)
                if block is None:
                    break
                self._ref(block)
                table.append(block)
                chain.append(h)
                parent = h
            self.prefix_hits += len(table)
        self.tables[seq_id], self.chains[seq_id] = table, chain
        return len(table) * self.block_size

    def fork(self, parent_id: int, child_id: int, max_tokens: int) -> int:
        """Start `child_id` sharing the parent's full, registered blocks covering at most
        `max_tokens` tokens. Returns the number of tokens shared."""
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id} already has a block table")
        n = min(len(self.chains.get(parent_id, [])), max_tokens // self.block_size)
        shared = self.tables[parent_id][:n]
        for b in shared:
            self._ref(b)
        self.tables[child_id], self.chains[child_id] = list(shared), self.chains[parent_id][:n]
        return n * self.block_size

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` tokens. All or nothing: False (and no change)
        when not enough blocks are free."""
        table = self.tables.setdefault(seq_id, [])
        self.chains.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def register(self, seq_id: int, token_ids: Seq[int], num_computed: int) -> None:
        """Hash the sequence's blocks that became full and computed, for later reuse."""
        if not self.enable_prefix_caching:
            return
        table, chain = self.tables[seq_id], self.chains[seq_id]
        bs = self.block_size
        for i in range(len(chain), min(num_computed // bs, len(table))):
            h = block_hash(chain[-1] if chain else b"", token_ids[i * bs:(i + 1) * bs])
            chain.append(h)
            block = table[i]
            if h not in self.block_of_hash and self.hash_of[block] is None:
                self.block_of_hash[h] = block
                self.hash_of[block] = h

    def free_seq(self, seq_id: int) -> None:
        """Drop the sequence's references; unreferenced blocks join the free queue, last block
        first, so a prefix's tail is evicted before its head."""
        table = self.tables.pop(seq_id, None)
        self.chains.pop(seq_id, None)
        if table is None:
            return
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise AssertionError(f"block {block} freed more often than referenced")
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def reset_prefix_cache(self) -> None:
        for block in self.free:
            if (h := self.hash_of[block]) is not None:
                self.hash_of[block] = None
                self.block_of_hash.pop(h, None)

    def check_invariants(self) -> None:
        """Raise if the bookkeeping disagrees with itself (used by tests)."""
        counts = [0] * (self.num_blocks + 1)
        for table in self.tables.values():
            for b in table:
                if b == 0:
                    raise AssertionError("the null block 0 was handed out")
                counts[b] += 1
        if counts != self.ref_counts:
            raise AssertionError("reference counts disagree with the block tables")
        free = {b for b in range(1, self.num_blocks + 1) if counts[b] == 0}
        if free != set(self.free):
            raise AssertionError("free queue disagrees with the reference counts")
        for h, b in self.block_of_hash.items():
            if self.hash_of[b] != h:
                raise AssertionError(f"hash map points at block {b} which holds another hash")


class HostBlockAllocator:
    """The leader's slots of the host swap space (`KVCache.host`): where a preempted
    sequence's KV blocks wait in host memory until it runs again (swap preemption).

    Slots are handed out lowest first, so one sequence's blocks mostly form runs of
    consecutive slots and each rank copies them in few transfers (`KVCache.swap_out`).
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"the swap space needs num_slots >= 0, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # descending: pop() gives the lowest
        self.peak_used = 0  # the most slots in use at once (for sizing --swap-space)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def take(self, n: int) -> list[int] | None:
        """`n` free slots, lowest first; None (and no change) when fewer are free."""
        if n > len(self._free):
            return None
        slots = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_used)
        return slots

    def release(self, slots: Seq[int]) -> None:
        self._free.extend(slots)
        self._free.sort(reverse=True)
        if len(set(self._free)) != len(self._free) or (self._free and
                                                         self._free[0] >= self.num_slots):
            raise AssertionError("swap slots released twice or never taken")
