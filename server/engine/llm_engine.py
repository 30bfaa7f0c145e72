"""The engine as the HTTP side sees it, and engine v2's worker.

The interface (`EngineAPI`: submit, control, in_flight, variants_in_flight, start,
serve_forever, stop; `QueueFull`) is what server/ imports; `LLMEngine` implements it
(engine v2, the one engine): iteration-level batching over mixed variants. Every step
(one forward pass) its worker thread:
1. runs pending admin actions (control jobs, `run_controls`);
2. drops cancelled sequences, admits waiting requests into free KV slots (FIFO across
   all variants: requests of different variants share every step, so no variant holds
   the model and none starves);
3. asks the scheduler (scheduler.py, policy only) for the step: one decode row per
   running sequence, then prompt chunks within `max_step_tokens`, and which variant to
   have merged in the resident weights (the cost model, policy.py);
4. packs the step (batch.py: everything it reads goes to the device in one copy),
   runs the forward (model_runner.py) and the batched sampler (sampling.py) on the
   device, brings the sampled tokens back (the step's one host synchronization),
   streams text, and frees the slots of finished sequences.

A step that fails ends the request that caused it, never its neighbours (retried one
sequence per step). All torch work of the server runs on this one thread: with
OpenMP/MKL on CPU, compute started from a second thread of the same process ran at
~60% speed here (BENCHMARKS.md), so nothing else in the server touches torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from server.config import Settings
from server.engine.batch import Batch, Packing, pack
from server.engine.cache import CacheFull
from server.engine.core import Engine, WeightsUnavailable
from server.engine.job import (
    INTERNAL,
    NO_ROOM,
    UNAVAILABLE,
    Event,
    Finish,
    Job,
    JobError,
    Target,
    TokenLogprob,
)
from server.engine.kernels import decode_kernels
from server.engine.kv_cache import KVCache
from server.engine.loader import Loader
from server.engine.model_runner import ModelRunner
from server.engine.policy import MergePolicy
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, end_token_ids
from server.engine.sparse import use_native
from server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(RuntimeError):
    pass


class EngineAPI(Protocol):
    """What the HTTP side uses of an engine."""

    def submit(self, job: Job) -> None: ...
    def control(self, fn: Callable[[Engine], T]) -> Future[T]: ...
    def in_flight(self, variant: str) -> int: ...
    def variants_in_flight(self) -> set[str]: ...
    def start(self) -> None: ...
    def serve_forever(self) -> None: ...
    def stop(self) -> None: ...


def run_controls(
    controls: list[tuple[Callable[[Engine], Any], Future[Any]]], engine: Engine
) -> None:
    """Run admin actions on the worker thread; each result or error goes to its future."""
    for fn, fut in controls:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(engine))
            except BaseException as e:  # handed to the waiting request
                fut.set_exception(e)


class LLMEngine:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        model = engine.model
        cfg = model.config
        max_len = min(engine.max_positions, settings.max_prompt_tokens + settings.max_new_tokens)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = KVCache(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            head_dim,
            max_len,
            settings.kv_cache_bytes,
            settings.max_batch_size,
            engine.dtype,
            engine.device,
        )
        self.runner = ModelRunner(
            model, self.kv, *decode_kernels(settings.decode_kernels, engine.device, engine.dtype)
        )
        engine.matrix_names = self.runner.matrix_names
        engine.fused_matrices = self.runner.fused
        engine.vector_slots = self.runner.vector_slots
        self.native = use_native(settings.delta_kernel, engine.device, engine.dtype)
        self.packing = Packing(
            engine.layout,
            int(model.config.vocab_size),
            self.runner.vector_size,
            engine.device,
            self.native,
        )
        policy = MergePolicy.calibrate(engine, self.native, settings.merge_policy)
        self.scheduler = Scheduler(settings.max_step_tokens, policy)
        self.eos = end_token_ids(model, engine.tokenizer)
        self._waiting: deque[Job] = deque()
        self._running: list[Sequence] = []
        self._control: deque[tuple[Callable[[Engine], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._held: str | None = None  # the merged variant, its layout held in use
        self._admitting: Job | None = None  # popped from the queue, not yet running
        self.loader = Loader(engine.load_plain, settings.loader_depth, self._wake)
        self._stalled = False  # nothing runs, and every waiting request waits for a load
        self._on_loop: set[str] = set()  # variants to lay out on the step loop after all
        self._waited: dict[int, float] = {}  # id(job) -> when it began to wait for a layout
        self._in_step: list[Sequence] = []  # the sequences of the step being run
        self._suspects: deque[Sequence] = deque()  # after a failed step: retried alone
        log.info(
            "engine v2 on %s: %d KV slots of %d positions (%.0f MiB), sparse deltas by %s, "
            "merge %s (sparse %.2g s per entry and token, swap %.2g s per entry)",
            engine.device,
            self.kv.n_slots,
            self.kv.max_len,
            self.kv.nbytes / 2**20,
            "the native kernel" if self.native else "the torch reference",
            settings.merge_policy,
            policy.sparse_s,
            policy.swap_s,
        )

    # ------------------------------------------------------------------ the interface

    def start(self) -> None:
        self.loader.start()
        self._thread = threading.Thread(target=self._loop, name="deltaserve-worker", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.loader.start()
        self._thread = threading.current_thread()
        self._loop()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._waiting:
                job.finish_reason = Finish.CANCELLED
                job.emit(Event.DONE, job)
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.loader.stop()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.settings.queue_limit:
                raise QueueFull(
                    f"{len(self._waiting)} requests queued (limit {self.settings.queue_limit})"
                )
            self._waiting.append(job)
            self.metrics.queue_length.set(len(self._waiting))
            self._stalled = False
            self._cond.notify_all()

    def control(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the worker thread before the next step."""
        fut: Future[T] = Future()
        with self._cond:
            self._control.append((fn, fut))
            self._cond.notify_all()
        return fut

    def in_flight(self, variant: str) -> int:
        with self._cond:
            queued = sum(1 for j in self._waiting if j.variant == variant)
            admitting = self._admitting is not None and self._admitting.variant == variant
            return queued + admitting + sum(1 for s in self._running if s.variant == variant)

    def variants_in_flight(self) -> set[str]:
        """The variants (compositions included) with queued or running requests."""
        with self._cond:
            names = {j.variant for j in self._waiting} | {s.variant for s in self._running}
            if self._admitting is not None:
                names.add(self._admitting.variant)
        return {v for v in names if v is not None}

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._control or self._waiting or self._running):
                    self._cond.wait()
                if self._stalled and not (self._stop or self._control):
                    # every waiting request waits for the loader: wake when a load is
                    # done, a request comes, or the oldest one's wait runs out
                    self._cond.wait(timeout=0.05)
                self._stalled = False
                if self._stop:
                    break
                controls = list(self._control)
                self._control.clear()
            try:
                if controls and self._held is not None:
                    self._set_merged(None)  # admin actions see the base, nothing held
                run_controls(controls, self.engine)
                self.step()
            except WeightsUnavailable:
                log.exception("the resident weights cannot be restored: refusing to serve")
                self._fail_all(UNAVAILABLE)
            except Exception:
                self._step_failed()
        for seq in list(self._running):
            self._finish(seq, Finish.CANCELLED)

    def _step_failed(self) -> None:
        """A failed step ends the request that caused it, never its neighbours: a step
        of several sequences is retried one sequence per step (nothing of a failed
        step was kept: a sequence advances only after its forward), and the sequence
        that fails alone is ended with an error. A failure outside any step's
        sequences (an admin preface, the weights check) ends the running requests."""
        ids = [s.job.request_id for s in self._in_step]
        log.exception("step failed (requests %s)", ids)
        if self._suspects:
            seq = self._suspects.popleft()
            self._finish(seq, Finish.ERROR, INTERNAL)
        elif len(self._in_step) == 1:
            self._finish(self._in_step[0], Finish.ERROR, INTERNAL)
        elif self._in_step:
            self._suspects = deque(self._in_step)
        else:
            for seq in list(self._running):
                self._finish(seq, Finish.ERROR, INTERNAL)
        self._in_step = []
        self._sync_held()
        if self.engine.active is not None:  # a clean, verified base for the retries
            try:
                self._set_merged(None)
            except WeightsUnavailable:
                self._fail_all(UNAVAILABLE)
            except Exception:
                log.exception("unmerging after a failed step failed")
                self._sync_held()

    def _sync_held(self) -> None:
        """After a failed swap or a repair the engine may hold the base while a merged
        variant's layout is still held here: release it. After an admin action that
        put a variant in place (a preload), the base goes back: the step plan decides
        what is merged, and holds its layout while it is."""
        if self._held is not None and self.engine.active != self._held:
            self.engine.release_layout(self._held)
            self._held = None
        if self._held is None and self.engine.active is not None:
            self.engine.activate(None)

    def _fail_all(self, error: JobError) -> None:
        for seq in list(self._running):
            self._finish(seq, Finish.ERROR, error)
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            job.finish_reason = Finish.ERROR
            job.emit(Event.ERROR, error)

    def step(self) -> None:
        """One step: admit, plan, pack, forward, sample, stream (the loop runs it; a
        benchmark or a test on the thread that loaded the model may run it by hand)."""
        self._adopt_loads()
        for seq in [s for s in self._running if s.job.cancelled.is_set()]:
            self._finish(seq, Finish.CANCELLED)
        self._in_step = []
        self.engine.check()  # the resident weights agree with what the engine says
        self._sync_held()  # (a repair puts the base back)
        if self._held is not None and not self._running and self.engine.stale(self._held):
            self._set_merged(None)  # its file was replaced: the next request reloads it
        while self._suspects and self._suspects[0] not in self._running:
            self._suspects.popleft()
        if not self._suspects:
            self._admit()
        if not self._running:
            with self._cond:
                self._stalled = bool(self._waiting)
            return
        running = [self._suspects[0]] if self._suspects else self._running
        decode, chunks = self.scheduler.plan(running)
        self._in_step = decode + [s for s, _ in chunks]
        merged = self._merge(decode, chunks)
        self.kv.clean_for_decode([(s.slot, s.length) for s in decode])
        batch = pack(decode, chunks, merged, self.packing)
        t0 = time.perf_counter()
        out = self._run(batch)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        self._observe(batch, merged)
        sampled, scored = batch.sampling.read(out)
        for sc, entries in zip(batch.scored, scored, strict=True):  # echo: prompt logprobs
            self._score(sc.seq, entries)
        for s, n in chunks:
            s.prefilled += n
            s.prompt_done()
        for seq, (token, entry) in zip(batch.sampled, sampled, strict=True):
            self._take(seq, token, entry)
        self._in_step = []
        if self._suspects:
            self._suspects.popleft()  # it ran alone without failing: not the culprit
        for seq in [s for s in self._running if s.done]:
            self._finish(seq, seq.job.finish_reason or Finish.STOP)

    def _run(self, batch: Batch) -> Any:
        """The step on the device: forward, sampling, and the one copy back (its tokens
        and the logprobs asked for): the step's one host synchronization."""
        logits = self.runner.forward(batch.step)
        assert batch.step.sampling is not None
        return batch.sampling.run(logits, batch.step.sampling).cpu()

    def _wake(self) -> None:
        with self._cond:
            self._stalled = False
            self._cond.notify_all()

    def _adopt_loads(self) -> None:
        """Put the variants the loader laid out in the engine's tiers. One that failed
        to load or to fit is laid out on the step loop when a request needs it (its
        error, or its wait for room, then concerns that request alone)."""
        for done in self.loader.take():
            ok = False
            if done.result is not None:
                ok = self.engine.adopt(done.name, *done.result)
            if not ok:
                self._on_loop.add(done.name)
            outcome = "ok" if ok else "failed" if done.error is not None else "discarded"
            self.metrics.layout_loads.labels("loader", outcome).inc()

    def _ready(self, job: Job) -> bool:
        """Whether `job` can be admitted now. A plain variant that is not laid out is
        asked of the loader instead, until the request has waited `load_wait_s`."""
        v, target = job.variant, job.target
        if v is None or target is None or job.cancelled.is_set() or v in self.engine.layouts:
            return True
        if v in self._on_loop or target.composed:  # compositions: merged here
            return True
        now = time.perf_counter()
        self._waited.setdefault(id(job), now)
        if now - job.enqueued >= self.settings.load_wait_s:
            return True  # it waited long enough: laid out on the step loop, nothing starves
        self.loader.want(v)
        return False

    def _admit(self) -> None:
        """Admit waiting requests into free KV slots, oldest first. A request whose
        variant is still being laid out keeps its place in the queue while later ones
        whose variants are ready go ahead of it (the loader works ahead of the queue);
        a request that must wait for room for its layout stops admission."""
        i = 0
        while True:
            with self._cond:
                if self.kv.free == 0 or i >= len(self._waiting):
                    break
                job = self._waiting[i]
            if not self._ready(job):
                i += 1
                continue
            with self._cond:
                self._waiting.remove(job)
                self._admitting = job
                self.metrics.queue_length.set(len(self._waiting))
            started = False
            try:
                started = self._admit_one(job)
            finally:
                with self._cond:
                    if not started:  # back at its place: it waits for a layout's room
                        self._waiting.insert(i, job)
                    self._admitting = None
            if not started:
                break

    def _admit_one(self, job: Job) -> bool:
        """Start `job`: its layout held, a KV slot, a Sequence in the running set; or end
        it with an error that concerns it alone. False: it must wait for room for its
        layout (the caller puts it back; in_flight counts it throughout, so a delete
        never slips in between)."""
        waited = self._waited.pop(id(job), None)
        if job.cancelled.is_set():
            job.finish_reason = Finish.CANCELLED
            job.emit(Event.DONE, job)
            return True
        now = time.perf_counter()
        job.started = now
        self.metrics.queue_seconds.observe(now - job.enqueued)
        acquired, slot = False, None
        try:
            if job.variant is not None:
                assert job.target is not None  # a Job's target names its variant
                laid_out = job.variant in self.engine.layouts
                self._acquire(job.target)
                acquired = True
                self._on_loop.discard(job.variant)
                if laid_out:
                    self.metrics.layout_hits.inc()
                else:
                    self.metrics.layout_loads.labels("step", "ok").inc()
                if waited is not None:
                    self.metrics.layout_wait_seconds.observe(now - waited)
            slot = self.kv.allocate()
            seq = Sequence(job, slot, self.engine.tokenizer, self.eos, self.engine.texts)
        except Exception as e:  # this request alone waits or fails, never its neighbours
            if slot is not None:
                self.kv.release(slot)
            if acquired and job.variant is not None:
                self.engine.release_layout(job.variant)
            if isinstance(e, CacheFull) and self._running:
                if waited is not None:
                    self._waited[id(job)] = waited
                return False  # every laid-out variant is in use: it waits for one
            if isinstance(e, CacheFull):
                log.warning("request %s: %s", job.request_id, e)
                job.finish_reason = Finish.ERROR
                job.emit(Event.ERROR, NO_ROOM)
                return True
            log.exception("admitting request %s for %r failed", job.request_id, job.variant)
            job.finish_reason = Finish.ERROR
            job.emit(Event.ERROR, INTERNAL)
            return True
        with self._cond:
            self._running.append(seq)
        return True

    def _acquire(self, target: Target) -> None:
        """Hold the target's layout; if only the merged variant's hold is in the way,
        unmerge it first. A merged variant whose file changed on disk (as the request's
        file versions tell) is unmerged first too, so the new request gets the new file
        (when no other holds it)."""
        variant = target.key
        self.engine.observe(target)
        if variant == self._held and self.engine.stale(variant):
            self._set_merged(None)
        try:
            self.engine.acquire_layout(variant)
        except CacheFull:
            if self._held is None or self._held == variant:
                raise
            self._set_merged(None)
            self.engine.acquire_layout(variant)

    def _merge(self, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> str | None:
        """Put the scheduler's choice of merged variant in place; returns it."""
        engine = self.engine
        variants = {s.variant for s in decode} | {s.variant for s, _ in chunks}
        variants |= {engine.active}
        kept = {v: engine.kept_entries(v) for v in variants if v is not None}
        want = self.scheduler.merged(engine.active, decode, chunks, kept, engine.materialized)
        if want is not None and engine.stale(want):
            # its file changed while rows hold the old layout: merging would read the
            # new file and mix versions, so its rows stay unmerged until it reloads
            want = None
        self._set_merged(want)
        return engine.active

    def _set_merged(self, want: str | None) -> None:
        """Merge `want` (None: the base alone). The merged variant's layout is held in
        use while it is merged: rows of other variants subtract it every step."""
        if want == self.engine.active:
            return
        if want is not None:
            self.engine.acquire_layout(want)
        try:
            swap = self.engine.activate(want)
        except Exception:
            if want is not None:
                self.engine.release_layout(want)
            self._sync_held()  # the engine is back on the base
            raise
        if self._held is not None:
            self.engine.release_layout(self._held)
        self._held = want
        self.scheduler.policy.observe_swap(swap, self.engine.kept_entries(want) if want else 0)
        self.metrics.swap_seconds.labels(swap.mode.value).observe(swap.seconds)

    def _score(self, seq: Sequence, entries: list[TokenLogprob]) -> None:
        try:
            seq.add_prompt_logprobs(entries)
        except Exception:
            log.exception("request %s failed while scoring its prompt", seq.job.request_id)
            self._finish(seq, Finish.ERROR, INTERNAL)

    def _take(self, seq: Sequence, token: int, entry: TokenLogprob | None) -> None:
        if seq.done:  # ended while scoring its prompt
            return
        if seq.job.cancelled.is_set():
            seq.finish(Finish.CANCELLED)
            return
        try:  # a row that fails ends alone, never its neighbours
            seq.add(token, entry)
        except Exception:
            log.exception("request %s failed while sampling", seq.job.request_id)
            self._finish(seq, Finish.ERROR, INTERNAL)

    def _finish(self, seq: Sequence, reason: Finish, error: JobError | None = None) -> None:
        seq.finish(reason)
        if seq in self._running:
            with self._cond:
                self._running.remove(seq)
            self.kv.release(seq.slot)
            if seq.variant is not None:
                self.engine.release_layout(seq.variant)
        job = seq.job
        job.finished = time.perf_counter()
        if error is not None:
            job.emit(Event.ERROR, error)
        else:
            job.emit(Event.DONE, job)

    def _observe(self, batch: Batch, merged: str | None) -> None:
        m = self.metrics
        m.step_rows.observe(int(batch.step.ids.numel()))
        m.step_variants.observe(len({g.variant for g in batch.groups if g.variant is not None}))
        m.steps.labels("merged" if merged is not None else "unmerged").inc()
        m.kv_slots_used.set(self.kv.used)
