"""Compact keys of strings and a sorted index over them: the whole-set lookups of the data stages.

An Arrow hash table (``pc.index_in``/``is_in``) or a Python set of N paths costs 50-100+ bytes
per entry, and ``pc.index_in`` rebuilds its table for every lookup batch. Here each string is a
128-bit key (BLAKE2b, two uint64 columns), sorted once; a lookup is a binary search
(``np.searchsorted``). 16 bytes per key plus 8 for its row: what ingest and align keep across
the whole set. Two different strings share a key with probability ~N^2 / 2^129 (1e-25 at 10M);
keys whose first 64 bits agree are still told apart by the second 64 bits, exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

KEY_BYTES = 16
SLICE = 8192  # strings turned into Python objects at once


def string_keys(values: Iterable[str | None]) -> np.ndarray:
    """(n, 2) uint64 keys of ``values``; a None gets the key of the empty string."""
    digests = b"".join(_digest(v or "") for v in values)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2)


def _digest(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")  # never raises: same string, same bytes
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def arrow_keys(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, 2) uint64 keys of an Arrow string column, SLICE strings at a time (nulls as "")."""
    out = np.empty((len(values), 2), dtype=np.uint64)
    for start in range(0, len(values), SLICE):
        part = values.slice(start, SLICE)
        out[start : start + len(part)] = string_keys(part.to_pylist())
    return out


@dataclass
class KeyIndex:
    """Keys sorted by (hi, lo) and the row each came from: lookups by binary search."""

    hi: np.ndarray  # uint64, sorted
    lo: np.ndarray  # uint64, sorted within equal hi
    rows: np.ndarray  # int64: the row (position in the build order) of each sorted key

    @classmethod
    def build(cls, keys: np.ndarray) -> KeyIndex:
        """Index (n, 2) keys; among equal keys the earliest row sorts first (stable)."""
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # lexsort is stable
        return cls(keys[order, 0], keys[order, 1], order.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.rows)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The first row holding each key, -1 where the key is absent (int64, one per key)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if not len(self.rows) or not len(keys):
            return out
        at = np.searchsorted(self.hi, keys[:, 0], side="left")
        inside = np.minimum(at, len(self.hi) - 1)
        same_hi = self.hi[inside] == keys[:, 0]
        hit = same_hi & (self.lo[inside] == keys[:, 1])
        out[hit] = self.rows[inside[hit]]
        # first 64 bits equal, last differ: another key of the same hi may follow (rare)
        for i in np.flatnonzero(same_hi & ~hit).tolist():
            out[i] = self._scan(int(at[i]), keys[i])
        return out

    def _scan(self, start: int, key: np.ndarray) -> int:
        stop = int(np.searchsorted(self.hi, key[0], side="right"))
        for j in range(start, stop):
            if self.lo[j] == key[1]:
                return int(self.rows[j])
        return -1

    def repeated(self) -> np.ndarray:
        """Rows whose key an earlier row already holds (sorted by row)."""
        if len(self.rows) < 2:
            return np.zeros(0, dtype=np.int64)
        same = (self.hi[1:] == self.hi[:-1]) & (self.lo[1:] == self.lo[:-1])
        return np.sort(self.rows[1:][same])
