"""Which stored entry holds the KV of a token sequence's first blocks: a chain-hash index with verification.

Block ``i`` of a stored prefix is indexed by a hash over the session and *every* token of blocks ``0..i``
(the KV of a block depends on all tokens before it). A lookup walks the new sequence's chain and stops at
the first miss; every hit is verified token for token against the stored tokens, so a hash collision can
never serve KV of other tokens. When two entries hold the same block, the newest one serves it.

Both KV tiers use it: the CPU store for finished turns' host copies, the device KV manager for finished
turns whose blocks are still resident.
"""

from __future__ import annotations

from collections.abc import Hashable


def chain_hashes(token_ids: list[int], block_size: int, num_blocks: int, session_id: str | None) -> list[int]:
    """Hash of block i covers the session and every token of blocks 0..i (a prefix, not just the block)."""
    return extend_chain(None, token_ids, block_size, 0, num_blocks, session_id)


def extend_chain(last: int | None, token_ids: list[int], block_size: int, start: int, end: int,
                 session_id: str | None) -> list[int]:
    """Chain hashes of blocks ``start..end-1``, given ``last``, the hash of block ``start - 1`` (None at 0)."""
    out, h = [], hash(("fs-kv", session_id)) if last is None else last
    for i in range(start, end):
        h = hash((h, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        out.append(h)
    return out


class PrefixIndex:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._tokens: dict[Hashable, list[int]] = {}  # key -> its tokens (whole blocks)
        self._hashes: dict[Hashable, list[int]] = {}  # key -> chain hash of each block
        self._by_hash: dict[int, tuple[Hashable, int]] = {}  # chain hash -> (key, block index)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens(self, key: Hashable) -> list[int]:
        return self._tokens[key]

    def add(self, key: Hashable, token_ids: list[int], session_id: str | None) -> None:
        """Index ``key`` as holding the KV of ``token_ids`` (whole blocks; a partial last block is ignored)."""
        assert key not in self._tokens, f"{key!r} is indexed already"
        num_blocks = len(token_ids) // self.block_size
        hashes = chain_hashes(token_ids, self.block_size, num_blocks, session_id)
        self._tokens[key] = list(token_ids[: num_blocks * self.block_size])
        self._hashes[key] = hashes
        for i, h in enumerate(hashes):
            self._by_hash[h] = (key, i)

    def remove(self, key: Hashable) -> None:
        self._tokens.pop(key)
        for h in self._hashes.pop(key):
            if self._by_hash.get(h, (None,))[0] == key:
                del self._by_hash[h]

    def match(self, token_ids: list[int], session_id: str | None,
              hashes: list[int] | None = None) -> list[tuple[Hashable, int]]:
        """``(key, block index)`` serving each of ``token_ids``' first blocks, as far as they are stored,
        leaving at least one token to compute (a request must compute something to sample from).
        ``hashes``: the chain hashes of ``token_ids``' full blocks when the caller has them cached."""
        if not self._by_hash:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        if hashes is None:
            hashes = chain_hashes(token_ids, self.block_size, max_blocks, session_id)
        hits: list[tuple[Hashable, int]] = []
        verified_key, verified_to = None, 0  # the entry whose tokens [0, verified_to) equal token_ids'
        for i, h in enumerate(hashes[:max_blocks]):
            hit = self._by_hash.get(h)
            if hit is None or hit[1] != i:
                break
            key = hit[0]
            hi = (i + 1) * self.block_size
            # verify the whole prefix against this entry (only the new block when the earlier blocks were
            # verified against the same entry)
            lo = verified_to if key == verified_key else 0
            if self._tokens[key][lo:hi] != token_ids[lo:hi]:
                break  # a hash collision: never serve KV of other tokens
            verified_key, verified_to = key, hi
            hits.append(hit)
        return hits

    def check_invariants(self) -> None:
        assert self._tokens.keys() == self._hashes.keys()
        for h, (key, i) in self._by_hash.items():
            assert self._hashes[key][i] == h, "stale prefix index entry"
