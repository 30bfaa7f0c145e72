"""What the app holds while it runs (built in the lifespan, no work at import time)."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool

from deltastore.store import DeltaStore
from server.compose import Compositions
from server.config import Settings
from server.engine.core import Engine
from server.engine.llm_engine import EngineAPI
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.engine.grammar import Grammars

T = TypeVar("T")


@dataclass
class AppState:
    settings: Settings
    store: DeltaStore
    metrics: Metrics
    base_dir: Path | None = None
    base_name: str = "base"
    engine: Engine | None = None
    scheduler: EngineAPI | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    ready_at: float | None = None
    demos: str | None = None  # the demo variants: building, ready, or failed: why
    lora_modules: str | None = None  # --lora-modules: building, ready, or failed: why
    retiring: set[str] = field(default_factory=set)  # deleted, draining in-flight requests
    replacing: set[str] = field(default_factory=set)  # new requests wait for the new file
    at_door: int = 0  # requests waiting for a replace (bounded by queue_limit)
    key_digests: list[bytes] = field(init=False)  # what inference accepts (empty: open)
    compositions: Compositions = field(init=False)  # "a+b" and registered recipes
    # The HTTP side's own tokenizer (the worker's is never shared), one caller at a time
    # (a Rust tokenizer is not safe to call from several threads), off the event loop.
    tokenizer: Any = None
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    _token_text: dict[int, str] = field(default_factory=dict)
    _token_bytes: dict[int, list[int]] = field(default_factory=dict)
    # structured output's compiled grammars (server/structured.py), built on first use
    grammars: Grammars | None = None
    # admin actions on one name run one at a time (upload, replace, delete, preload…)
    _name_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )
    _import_lock: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.key_digests = self.settings.key_digests()  # once, not per request
        self.compositions = Compositions(self.store, self.settings.max_composition_members)

    async def tokenize(self, fn: Callable[[Any], T]) -> T:
        """fn(tokenizer) on a worker thread of the HTTP side, under the tokenizer lock."""

        def run() -> T:
            with self._tokenizer_lock:
                return fn(self.tokenizer)

        return await run_in_threadpool(run)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text (logprobs, token_strs): decoded once, then cached."""

        def decode(tok: Any, missing: list[int]) -> list[str]:
            return [tok.decode([t]) for t in missing]

        return await self._per_token(self._token_text, ids, decode)

    async def token_bytes(self, ids: list[int]) -> list[list[int]]:
        """Each token's own bytes (chat logprobs' `bytes`): a byte-level BPE token's
        raw bytes, so pieces of one multi-byte character add up to it."""

        def raw(tok: Any, missing: list[int]) -> list[list[int]]:
            pieces = tok.convert_ids_to_tokens(missing)
            return [_piece_bytes(tok, t, p) for t, p in zip(missing, pieces, strict=True)]

        return await self._per_token(self._token_bytes, ids, raw)

    async def _per_token(
        self, cache: dict[int, T], ids: list[int], fn: Callable[[Any, list[int]], list[T]]
    ) -> list[T]:
        """fn(tokenizer, ids) for the ids not yet in `cache` (one call, off the loop)."""
        missing = [t for t in dict.fromkeys(ids) if t not in cache]
        if missing:
            cache.update(
                zip(missing, await self.tokenize(lambda tok: fn(tok, missing)), strict=True)
            )
        return [cache[t] for t in ids]

    def import_lock(self) -> asyncio.Lock:
        """Fine-tunes are compressed one at a time (each holds a model in memory)."""
        if self._import_lock is None:
            self._import_lock = asyncio.Lock()
        return self._import_lock

    def name_lock(self, name: str) -> asyncio.Lock:
        lock = self._name_locks.get(name)
        if lock is None:
            lock = self._name_locks[name] = asyncio.Lock()
        return lock


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (byte-level BPE tokenizers)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


def _piece_bytes(tok: Any, token: int, piece: str | None) -> list[int]:
    if piece and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return [int(piece[3:5], 16)]  # a sentencepiece byte-fallback piece
    backend = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    byte_level = type(backend).__name__ == "ByteLevel"
    if piece and byte_level and all(c in _BYTE_DECODER for c in piece):
        return [_BYTE_DECODER[c] for c in piece]
    if piece and "\u2581" in piece:  # sentencepiece's word boundary
        return list(piece.replace("\u2581", " ").encode())
    return list(str(tok.decode([token])).encode())
