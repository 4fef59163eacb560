"""The paged KV block pool and the automatic prefix cache: pure Python bookkeeping, no torch.

The runner holds one tensor per layer with room for ``num_blocks * block_size``
token positions; this module decides which block holds what. Block ``0`` is
the *null block*: never handed out, it is where padding rows write and what
padding positions read (masked). Every other block is in exactly one state:

- **used**: referenced by at least one sequence's block table (``ref > 0``);
- **cached**: unreferenced but holding a full block whose content hash is
  indexed, so a later prompt with the same prefix can take it back; these
  are evicted least-recently-freed first when the pool needs room;
- **free**: unreferenced, no hash.

Hashes chain: a full block's key is ``H(parent key, its token ids)``, with the
root key derived from a *salt* (model name, version, quantization), so a
block is reused only when the whole prefix before it is identical and it was
computed by the same weights.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

NULL_BLOCK = 0


def root_hash(salt: str) -> bytes:
    """The parent key of a sequence's first block: a digest of the salt (model identity)."""
    return hashlib.blake2b(b"rtws-kv\0" + salt.encode("utf-8"), digest_size=16).digest()


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    """Key of a full block: a 128-bit digest of the parent's key and the block's token ids."""
    data = array.array("q", (t & 0x7FFFFFFFFFFFFFFF for t in tokens)).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


@dataclass(slots=True)
class PoolStats:
    """Cumulative prefix-cache counters (tokens, as vLLM counts them) and evictions."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


class BlockPool:
    """Fixed pool of ``num_blocks`` KV blocks (block 0 reserved) with ref counts and a hash index.

    ``allocate`` prefers never-cached free blocks, then evicts the least
    recently freed cached block. ``free`` drops one reference per block; a
    block whose count reaches zero goes back to the free list, or, if it is
    indexed, to the tail of the eviction order.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("num_blocks must be >= 2 (block 0 is reserved)")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # a stack: lowest ids handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._by_hash: dict[bytes, int] = {}
        self.stats = PoolStats()

    # ------------------------------------------------------------------ queries

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now (free plus evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks indexed by hash (used or not)."""
        return len(self._by_hash)

    @property
    def num_cached_free(self) -> int:
        return len(self._evictable)

    def lookup(self, key: bytes) -> int | None:
        return self._by_hash.get(key)

    # ------------------------------------------------------------------ mutations

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with one reference each, or None (nothing taken) if fewer are available."""
        if n > self.num_free:
            return None
        out: list[int] = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                key = self.hash_of[b]
                if key is not None and self._by_hash.get(key) == b:
                    del self._by_hash[key]
                self.hash_of[b] = None
                self.stats.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def acquire(self, block: int) -> None:
        """Add a reference to an indexed block (a prefix-cache hit)."""
        if self.ref[block] == 0:
            self._evictable.pop(block, None)
        self.ref[block] += 1

    def free(self, blocks: Seq[int]) -> None:
        """Drop one reference per block, last block first (so a sequence's tail is evicted before its head)."""
        for b in reversed(blocks):
            if b == NULL_BLOCK:
                continue
            r = self.ref[b] - 1
            if r < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")
            self.ref[b] = r
            if r == 0:
                if self.hash_of[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, key: bytes) -> None:
        """Index a full block under ``key``. A key already indexed keeps its first block."""
        if key in self._by_hash or self.hash_of[block] is not None:
            return
        self._by_hash[key] = block
        self.hash_of[block] = key

    def clear_cache(self) -> None:
        """Forget every hash (unreferenced cached blocks become free)."""
        self._by_hash.clear()
        for b in range(1, self.num_blocks):
            self.hash_of[b] = None
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._free.append(b)


class BlockSequence(Protocol):
    """What the manager needs from a sequence (``rtws.scheduler.Sequence`` has it)."""

    block_table: list[int]
    block_hashes: list[bytes]
    num_committed: int
    num_cached: int

    def tokens(self, start: int, end: int) -> list[int]: ...


class KVCacheManager:
    """Block tables over a :class:`BlockPool`, with the prefix cache (``prefix_cache=False`` turns it off).

    Contract per sequence: :meth:`match_prefix` once when it is admitted
    (takes cached blocks for its prefix and sets ``num_cached``), :meth:`ensure`
    before every step that writes positions ``< n``, :meth:`commit` after the
    step (indexes the blocks that became full), :meth:`release` when it ends or
    is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, *, salt: str = "", prefix_cache: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.root = root_hash(salt)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hash_upto(self, seq: BlockSequence, num_blocks: int) -> None:
        """Extend ``seq.block_hashes`` to cover its first ``num_blocks`` full blocks."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            k = len(hashes)
            parent = hashes[-1] if hashes else self.root
            hashes.append(block_hash(parent, seq.tokens(k * bs, (k + 1) * bs)))

    def match_prefix(self, seq: BlockSequence, num_tokens: int, count: bool = True) -> int:
        """Take the cached blocks for the longest cached prefix of the first ``num_tokens`` tokens.

        At least one token is always left to compute (its logits pick the
        next token), so at most ``(num_tokens - 1) // block_size`` blocks hit.
        Returns the hit length in tokens (also set as ``num_cached``).
        """
        assert not seq.block_table, "match_prefix on a sequence that holds blocks"
        seq.num_cached = 0
        seq.num_committed = 0
        if not self.prefix_cache:
            return 0
        full = max(0, (num_tokens - 1) // self.block_size)
        self._hash_upto(seq, full)
        hit: list[int] = []
        for key in seq.block_hashes[:full]:
            b = self.pool.lookup(key)
            if b is None:
                break
            hit.append(b)
        for b in hit:
            self.pool.acquire(b)
        seq.block_table = hit
        seq.num_committed = len(hit)
        seq.num_cached = len(hit) * self.block_size
        if count:
            self.pool.stats.queries += num_tokens
            self.pool.stats.hits += seq.num_cached
        return seq.num_cached

    def can_hold(self, seq: BlockSequence, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs to hold ``num_tokens`` positions (0: it already does)."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def ensure(self, seq: BlockSequence, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens`` positions. False (nothing taken) if the pool is short."""
        need = self.can_hold(seq, num_tokens)
        if need == 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        seq.block_table.extend(got)
        return True

    def commit(self, seq: BlockSequence) -> None:
        """Index the blocks that ``num_cached`` now fills completely (prefix caching)."""
        if not self.prefix_cache:
            return
        full = min(seq.num_cached // self.block_size, len(seq.block_table))
        if full <= seq.num_committed:
            return
        self._hash_upto(seq, full)
        for k in range(seq.num_committed, full):
            self.pool.register(seq.block_table[k], seq.block_hashes[k])
        seq.num_committed = full

    def release(self, seq: BlockSequence) -> None:
        """Give back every block of ``seq`` (cached ones stay indexed, evictable)."""
        if seq.block_table:
            self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_committed = 0
