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
from server.engine.detokenizer import TokenTexts
from server.engine.job import Piece
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
    # The server's one tokenizer (the engine's): the HTTP side encodes with it one
    # caller at a time, off the event loop, while the worker only reads it (settled at
    # load: server/engine/detokenizer.py). `texts`: single tokens' texts, shared too.
    tokenizer: Any = None
    texts: TokenTexts | None = None
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
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
        """Each token's own text (/tokenize's token_strs), decoded once per id."""
        return [p.text for p in await self.token_pieces(ids)]

    async def token_pieces(self, ids: list[int]) -> list[Piece]:
        """Each token's own text and bytes (what the worker labels logprobs with)."""
        texts = self.texts
        assert texts is not None  # ready
        return await run_in_threadpool(lambda: [texts.piece(t) for t in ids])

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
