"""Answers of read calls kept in memory, dropped by every write that may change them.

Stat and Mounts are most of the RPCs containerd sends (its metadata Walk calls Stat
once per snapshot for every List). A value read outside the write lock may be stale
by the time it is stored, so each write bumps a generation after its commit and a
value is stored only if no write finished since its read began:

    gen = cache.generation(); value = read(); cache.put(key, value, gen)   # readers
    commit(); cache.drop(key, ...)                                         # writers
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

V = TypeVar("V")


class KeyedCache(Generic[V]):
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[str, V] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        return self._values.get(key)  # one dict lookup: atomic, no lock needed

    def generation(self) -> int:
        return self._generation

    def put(self, key: str, value: V, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a write finished since the read began: the value may be stale
            if len(self._values) >= self._limit:
                self._values.clear()  # a bound, not an eviction policy: refilled by the next reads
            self._values[key] = value

    def drop(self, *keys: str) -> None:
        """After a write that may change these keys' values (committed or not)."""
        with self._lock:
            self._generation += 1
            for key in keys:
                self._values.pop(key, None)
