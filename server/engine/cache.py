"""A byte-budgeted LRU with pinning and in-use protection: one per tier.

Vocabulary (as vLLM's LRU adapter manager): `add`, `get` (touches LRU order),
`remove`, `pin`/`unpin`, `list`; `acquire`/`release` mark what a running batch
uses. Eviction happens before adding, in LRU order, skipping pinned and in-use
entries, and calls `on_evict` so the owner frees the memory. Budgets are bytes,
never counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


class CacheFull(RuntimeError):
    """Nothing more can be evicted to make room (all pinned or in use)."""


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    in_use: int = 0


@dataclass(frozen=True)
class EntryInfo:
    name: str
    nbytes: int
    pinned: bool
    in_use: bool


class ByteLRU(Generic[V]):
    def __init__(
        self, tier: str, budget: int, on_evict: Callable[[str, V], None] | None = None
    ) -> None:
        if budget < 0:
            raise ValueError(f"{tier}: budget must be >= 0 bytes, got {budget}")
        self.tier, self.budget, self.on_evict = tier, budget, on_evict
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()  # oldest first
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0

    @property
    def used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def get(self, name: str) -> V | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(name)
            return entry.value

    def peek(self, name: str) -> V | None:
        """The value, without touching LRU order or the hit counters (for reports)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.value if entry is not None else None

    def add(self, name: str, value: V, nbytes: int) -> list[str]:
        """Insert (or replace) `name`; evicts LRU entries first. Returns what was evicted."""
        with self._lock:
            if nbytes > self.budget:
                raise CacheFull(f"{self.tier}: {name} needs {nbytes} B, budget is {self.budget} B")
            old = self._entries.pop(name, None)
            try:
                evicted = self._make_room(nbytes)
            except CacheFull:
                if old is not None:
                    self._entries[name] = old
                raise
            self._entries[name] = _Entry(value, nbytes, old.in_use if old else 0)
            return evicted

    def can_fit(self, nbytes: int) -> bool:
        with self._lock:
            free = self.budget - self.used
            free += sum(e.nbytes for n, e in self._entries.items() if self._evictable(n, e))
            return nbytes <= free

    def make_room(self, nbytes: int) -> list[str]:
        """Evict now what adding `nbytes` would evict (before allocating them)."""
        with self._lock:
            if nbytes > self.budget:
                raise CacheFull(f"{self.tier}: {nbytes} B exceeds the budget of {self.budget} B")
            return self._make_room(nbytes)

    def _evictable(self, name: str, entry: _Entry[V]) -> bool:
        return name not in self._pinned and entry.in_use == 0

    def _make_room(self, nbytes: int) -> list[str]:
        if not self.can_fit(nbytes):
            raise CacheFull(
                f"{self.tier}: no room for {nbytes} B (used {self.used} of {self.budget} B, "
                "the rest pinned or in use)"
            )
        evicted = []
        for name in list(self._entries):
            if self.used + nbytes <= self.budget:
                break
            entry = self._entries[name]
            if self._evictable(name, entry):
                self._drop(name)
                self.evictions += 1
                evicted.append(name)
        return evicted

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        if self.on_evict is not None:
            self.on_evict(name, entry.value)

    def remove(self, name: str) -> bool:
        """Drop `name` now (even if pinned; the caller knows it is not in use)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return False
            if entry.in_use:
                raise RuntimeError(f"{self.tier}: {name} is in use by a running batch")
            self._drop(name)
            return True

    def pin(self, name: str) -> None:
        with self._lock:
            self._pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)

    def is_pinned(self, name: str) -> bool:
        with self._lock:
            return name in self._pinned

    def acquire(self, name: str) -> None:
        with self._lock:
            self._entries[name].in_use += 1

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.in_use > 0:
                entry.in_use -= 1

    def list(self) -> list[EntryInfo]:
        """Entries, least recently used first."""
        with self._lock:
            return [
                EntryInfo(n, e.nbytes, n in self._pinned, e.in_use > 0)
                for n, e in self._entries.items()
            ]
