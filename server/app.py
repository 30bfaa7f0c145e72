"""The FastAPI app: state built in the lifespan, one router per resource.

    create_app(settings) -> FastAPI

The base loads in a background thread, so /health answers at once and /ready says
when the base is in place (completions answer 503 until then).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from deltastore.embedded import ensure_embedded_base
from deltastore.hub import resolve_ref
from deltastore.sources import open_model
from deltastore.store import DeltaStore
from server import errors
from server.adapters import install_lora_modules
from server.config import Settings
from server.engine.core import Engine
from server.engine.llm_engine import LLMEngine
from server.engine.model_runner import family_of
from server.engine.threads import prefer_the_step, serial_torch
from server.metrics import Metrics
from server.middleware import Guard
from server.routes import adapters, admin, health, openai
from server.state import AppState

log = logging.getLogger(__name__)


def _load_and_serve(state: AppState) -> None:
    """Load the base, then run the engine's loop on this same thread (llm_engine.py)."""
    settings = state.settings
    try:
        if settings.base is None:
            base_dir = ensure_embedded_base(progress=True)
        else:  # a directory, or a Hub id (from the Hub cache, downloaded unless offline)
            base_dir = resolve_ref(settings.base, settings.revision)
        state.base_dir = base_dir
        source = open_model(base_dir)
        family_of(source.config)  # a model the engine does not serve fails before loading
        engine = Engine(source, state.store, state.settings)
        state.tokenizer, state.texts = engine.tokenizer, engine.texts  # one tokenizer
        scheduler = make_scheduler(engine, state.settings, state.metrics)
        state.engine, state.scheduler = engine, scheduler
        state.ready_at = time.time()
        log.info(
            "ready: base %s (%s) on %s (%s) in %.1fs; %d variants in %s; admin API %s; %s",
            state.base_name,
            base_dir,
            engine.device,
            engine.dtype,
            state.ready_at - state.started,
            len(state.store.names()),
            state.store.root,
            "on" if state.settings.admin_token else "off (set DELTASERVE_ADMIN_TOKEN)",
            f"{len(state.settings.keys())} API keys" if state.settings.keys() else "no API keys",
        )
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("loading the base failed")
        return
    if state.settings.demo and state.settings.base is None:  # the embedded base's demos
        threading.Thread(
            target=_install_demos, args=(state, base_dir), name="deltaserve-demos", daemon=True
        ).start()
    if state.settings.lora_modules:
        threading.Thread(
            target=_install_lora_modules,
            args=(state, base_dir),
            name="deltaserve-lora-modules",
            daemon=True,
        ).start()
    scheduler.serve_forever()


def _install_demos(state: AppState, base_dir: Path) -> None:
    """Make the demo variants (first run only: cached after) while the base serves;
    each appears in /v1/models once it is in the store."""
    from deltastore.demo import install_demos

    serial_torch()  # serving goes first: the step's OpenMP team stays the only one
    state.demos = "building"
    try:
        install_demos(base_dir, state.store)
        state.demos = "ready"
    except Exception as e:
        state.demos = f"failed: {type(e).__name__}: {e}"
        log.exception("making the demo variants failed")


def _install_lora_modules(state: AppState, base_dir: Path) -> None:
    """Compress --lora-modules into the store while the base serves (once: a module
    already compressed from the same content is kept); each appears in /v1/models
    when it is in the store."""
    serial_torch()  # serving goes first: the step's OpenMP team stays the only one
    state.lora_modules = "building"
    try:
        install_lora_modules(state.settings, base_dir, state.store)
        state.lora_modules = "ready"
    except Exception as e:
        state.lora_modules = f"failed: {type(e).__name__}: {e}"
        log.exception("compressing --lora-modules failed")


def make_scheduler(engine: Engine, settings: Settings, metrics: Metrics) -> LLMEngine:
    """The engine's worker over the loaded base (a model type outside the runner's
    family table raises UnsupportedModel, naming the supported ones)."""
    return LLMEngine(engine, settings, metrics)


def check_servable(base: Path) -> None:
    """Refuse, from its config alone, a base whose model type the engine does not
    serve (UnsupportedModel names the supported ones)."""
    family_of(open_model(base).config)


def start(settings: Settings) -> tuple[AppState, threading.Thread]:
    """The app's state, with the base loading (then the scheduler running) on a worker
    thread of its own. The lifespan starts one; so does each Ray replica."""
    prefer_the_step()  # the step loop takes the GIL back sooner (engine/threads.py)
    state = AppState(settings, DeltaStore(settings.store), Metrics())
    state.base_name = settings.served_name()
    state.metrics.watch_engine(lambda: state.engine)
    worker = threading.Thread(
        target=_load_and_serve, args=(state,), name="deltaserve-worker", daemon=True
    )
    worker.start()
    return state, worker


def stop(state: AppState, worker: threading.Thread) -> None:
    while worker.is_alive() and state.scheduler is None and state.load_error is None:
        time.sleep(0.05)  # stopped while loading: let the load finish first
    if state.scheduler is not None:
        state.scheduler.stop()
    worker.join(timeout=30)


def wait_ready(state: AppState, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while state.engine is None or state.scheduler is None:
        if state.load_error or time.time() > deadline:
            raise RuntimeError(f"not ready: {state.load_error or 'timed out'}")
        time.sleep(0.02)


def create_app(settings: Settings, state: AppState | None = None) -> FastAPI:
    """The app; with `state` given, the caller started it (and stops it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state is not None:
            app.state.deltaserve = state
            yield
            return
        own, worker = start(settings)
        app.state.deltaserve = own
        yield
        stop(own, worker)

    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan)
    if state is not None:
        app.state.deltaserve = state
    errors.install(app)
    app.add_middleware(Guard)  # request ids, the body limit, the last-resort 500
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(adapters.router)
    app.include_router(health.router)
    return app


class ThreadedServer:
    """uvicorn serving `create_app(settings)` in a thread on `settings.host`, for tests
    and benchmarks (port 0 picks a free port). Stop it with `stop()`."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host=settings.host, port=settings.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="deltaserve-http", daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{settings.host}:{port}"

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.deltaserve
        return state

    def wait_ready(self, timeout: float = 120) -> None:
        wait_ready(self.state, timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
