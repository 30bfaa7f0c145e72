"""The engine: one resident base, and the tiers that put a variant in place.

Tiers, slowest to fastest (each an LRU budgeted in bytes, see cache.py):
    file in the store -> decoded delta (host) -> delta laid out on the device
    -> materialized variant (its own copies of the tensors its delta touches)

Activating a materialized variant rebinds those parameters to its tensors (pointer
swaps, no arithmetic). Any other variant is applied in place to the resident
weights with `apply_delta_`, and reverted bit-exactly when the engine switches
away. Admission to the materialized tier is frequency-aware: a variant is
materialized from its `materialize_after`-th use, and only if it has been used more
than the least recently used entry it would evict (counts halve every
AGE_EVERY activations). Admitting every variant on first use made one-off tail
variants evict hot ones: slower than no cache at all under Zipf traffic
(BENCHMARKS.md, serving comparison).

Invariant: the flat resident buffers hold the base, or the base plus exactly one
in-place variant (the active one), and every parameter is bound to its view of the
buffers, except a materialized variant's own tensors. Activation is transactional:
memory is allocated and caches evicted before a weight is touched, `apply_delta_`
rolls back on an exception, and if a swap fails anyway the engine checks the buffers
against the base's digest taken at load, reloads the base from disk when they
differ, and refuses to serve (`broken`) when even that cannot restore it.
`check()` verifies the invariant before every step.

What a name is read from comes with the requests (`Target`, resolved once on the
HTTP side): a delta file of the store, or a composition's members, merged. The
caches of a name remember the file versions they were made from; a request whose
versions differ (a file replaced behind the server's back) or an admin action
(`invalidate`) marks them stale, and a stale name is dropped from every tier once no
running request holds it. Steps never read a file's stamp.

Threading: not thread-safe. The scheduler's worker thread is its only caller; admin
actions reach it as jobs run on that thread between batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from deltastore import faults
from deltastore.apply import (
    BoundDelta,
    FlatWeights,
    UndoLog,
    apply_delta_,
    bind,
    check_meta,
    revert_delta_,
)
from deltastore.format import Delta, load_delta
from deltastore.merge import merge
from deltastore.sources import ModelSource, fingerprint
from deltastore.store import DeltaStore
from server.config import Settings
from server.engine.cache import ByteLRU, CacheFull
from server.engine.detokenizer import TokenTexts, settle
from server.engine.job import Target, Versions
from server.engine.threads import serial_torch

log = logging.getLogger(__name__)
T = TypeVar("T")
AGE_EVERY = 1000  # activations between halvings of the use counts
MAX_DEFINITIONS = 4096  # compositions remembered beyond those cached (clients write many)


class Mode(StrEnum):
    BASE = "base"
    INPLACE = "inplace"
    MATERIALIZED = "materialized"


@dataclass(frozen=True)
class Swap:
    variant: str | None
    mode: Mode
    seconds: float
    switched: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX-512 BF16 / AMX): there bf16 weights halve
    the bytes a step reads and run ~2x faster than fp32 (BENCHMARKS.md, engine v2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


class InUse(RuntimeError):
    """The variant is in use by running requests: it cannot be evicted now."""


class WeightsUnavailable(RuntimeError):
    """The resident weights could not be restored to a known state: refuse to serve."""


def digest(weights: FlatWeights, lock: threading.Lock | None = None) -> str:
    """sha256 over every resident byte (on CPU; a GPU buffer is copied in chunks),
    each 64 MB chunk read under `lock` when given."""
    h = hashlib.sha256()
    for buf in weights.buffers:
        raw = buf.view(torch.uint8)
        for s in range(0, raw.numel(), 1 << 26):
            with lock or contextlib.nullcontext():
                h.update(raw[s : s + (1 << 26)].cpu().numpy().data)
    return h.hexdigest()


class Background(Generic[T]):
    """A value made in a background thread from load on, so that /ready does not wait
    for it (an 8B base's digest or fingerprint: ~10 s or more on 2 cores). `value()`
    waits for it and raises what making it raised."""

    def __init__(self, what: str, make: Callable[[], T]) -> None:
        self.what = what
        self._value: T | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._make, args=(make,), name=what, daemon=True)
        self._thread.start()

    def _make(self, make: Callable[[], T]) -> None:
        serial_torch()  # the step's OpenMP team stays the only one (engine/threads.py)
        t0 = time.perf_counter()
        try:
            self._value = make()  # hashlib releases the GIL: serving goes on meanwhile
        except BaseException as e:  # raised to whoever needs the value
            self._error = e
        self.seconds = time.perf_counter() - t0
        log.info("%s taken in %.1f s", self.what, self.seconds)

    @property
    def ready(self) -> bool:
        return not self._thread.is_alive()

    def known(self) -> T | None:
        """The value if made, else None (never waits)."""
        return self._value if self.ready else None

    def value(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise WeightsUnavailable(f"the {self.what} could not be taken") from self._error
        assert self._value is not None
        return self._value


class Engine:
    def __init__(self, source: ModelSource, store: DeltaStore, settings: Settings) -> None:
        self.source = source
        self.store = store
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        # the files' fingerprint (cached beside them: computed on a first start only)
        # and the resident bytes' digest are made in the background: /ready waits for
        # neither; a delta's check waits for the first, a write to the weights for the
        # second (so the digest is of the base as loaded)
        self._fingerprint = Background("base fingerprint", lambda: fingerprint(source))
        # the server's one tokenizer (the HTTP side encodes with it too)
        self.tokenizer: Any = settle(source.load_tokenizer())
        self.texts = TokenTexts(self.tokenizer)  # single tokens' texts, for logprobs
        self.model: Any = source.load_model(self.dtype).to(self.device).eval()
        self.weights = FlatWeights.from_module(self.model, self._fingerprint.value)
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        self._views = {n: self.weights.tensor(n) for n in self.params}
        self._ptrs = {n: v.data_ptr() for n, v in self._views.items()}
        # held by a write to the weights made while the digest may be read (the cost
        # model's swap timing at startup): the digest reads each chunk under it
        self.digest_lock = threading.Lock()
        self._digest = Background("base digest", lambda: digest(self.weights, self.digest_lock))
        self.broken: str | None = None  # set when the base could not be restored
        self._dirty = False  # a write to the weights or their bindings is under way
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.host: ByteLRU[Delta] = ByteLRU("host", settings.host_delta_cache_bytes)
        self.device_tier: ByteLRU[BoundDelta] = ByteLRU("device", settings.device_delta_cache_bytes)
        self.materialized: ByteLRU[dict[str, torch.Tensor]] = ByteLRU(
            "materialized", settings.materialized_cache_bytes
        )
        # engine v2: deltas laid out for mixed-variant steps (server/engine/sparse.py)
        self.layouts: ByteLRU[Any] = ByteLRU("mixed", settings.mixed_cache_bytes)
        self.matrix_names: list[str] = []  # set by the v2 scheduler's runner
        self.fused_matrices: dict[str, list[tuple[str, int]]] = {}  # the runner's fused slots
        self.vector_slots: dict[str, tuple[int, int]] = {}  # the runner's per-row vectors
        self.active: str | None = None
        self.mode = Mode.BASE
        self._undo: UndoLog | None = None
        self._touched: dict[str, tuple[str, ...]] = {}  # variant -> tensor names it changes
        self._stamps: dict[str, Versions] = {}  # variant -> the file versions of its caches
        self._stale: set[str] = set()  # variants whose files changed since their caches
        self._compositions: dict[str, Target] = {}  # key -> its members, from its requests
        self._uses: dict[str, float] = {}  # variant -> recent activations (aged)
        self._activations = 0
        self.materialize_after = settings.materialize_after

    @property
    def fingerprint(self) -> str:
        """The base files' fingerprint (waits while it is being taken)."""
        return self._fingerprint.value()

    def known_fingerprint(self) -> str | None:
        """The fingerprint, or None while it is being taken (never waits)."""
        return self._fingerprint.known()

    @property
    def base_digest(self) -> str:
        """sha256 of the resident base as loaded (waits while it is being taken)."""
        return self._digest.value()

    @property
    def tiers(self) -> tuple[ByteLRU[Any], ...]:
        return (self.materialized, self.layouts, self.device_tier, self.host)

    # ------------------------------------------------------------------ activation

    def activate(self, name: str | None, force: bool = False) -> Swap:
        """Put `name` (None: the base) in place of the active variant. `force`
        materializes it whenever the budget allows (an explicit preload)."""
        if name == self.active:
            if name is None or not self.stale(name):
                return Swap(name, self.mode, 0.0, switched=False)
            self.activate(None)  # its file changed on disk: put the new one in place
        if self.broken is not None:
            raise WeightsUnavailable(self.broken)
        t0 = time.perf_counter()
        try:
            self._deactivate()
            if name is not None:
                self._activate(name, force)
        except BaseException:
            # back to the base before the error propagates; the bytes are checked
            # against the digest when the failure came mid-write
            self.restore_base(verify=self._dirty)
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Swap(name, self.mode, time.perf_counter() - t0, switched=True)

    def _count_use(self, name: str) -> None:
        self._uses[name] = self._uses.get(name, 0.0) + 1
        self._activations += 1
        if self._activations % AGE_EVERY == 0:
            self._uses = {n: c / 2 for n, c in self._uses.items() if c >= 0.5}

    def _admit(self, name: str, nbytes: int, force: bool) -> bool:
        """Materialize `name`? Often enough used, and more than what it would evict."""
        tier = self.materialized
        if not tier.budget or not tier.can_fit(nbytes):
            return False
        if force:
            return True
        uses = self._uses.get(name, 0.0)
        if uses < self.materialize_after:
            return False
        if tier.budget - tier.used >= nbytes:
            return True  # room without evicting anything
        victim = next((e.name for e in tier.list() if not e.pinned and not e.in_use), None)
        return victim is None or uses > self._uses.get(victim, 0.0)

    def _activate(self, name: str, force: bool) -> None:
        self._digest.value()  # taken before any write: the digest is of the base as loaded
        self._drop_stale(name)
        self._count_use(name)
        tensors = self.materialized.get(name)
        if tensors is None:
            bound = self.bound(name)
            tensors = self._materialize(name, bound, force)
            if tensors is None:
                self._dirty = True
                self._undo = apply_delta_(self.weights, bound)
                faults.point("swap.applied")  # the delta in the weights, not yet recorded
                self.active, self.mode, self._dirty = name, Mode.INPLACE, False
                return
        self._dirty = True
        for n, t in tensors.items():
            self.params[n].data = t
        self._dirty = False
        self.materialized.acquire(name)
        self.active, self.mode = name, Mode.MATERIALIZED

    def _rebind_base(self) -> None:
        for n, view in self._views.items():
            if self.params[n].data_ptr() != self._ptrs[n]:
                self.params[n].data = view

    def _deactivate(self) -> None:
        self._dirty = True
        if self.mode is Mode.INPLACE:
            assert self._undo is not None
            revert_delta_(self.weights, self._undo)
            self._undo = None
        elif self.mode is Mode.MATERIALIZED:
            assert self.active is not None
            self._rebind_base()
            self.materialized.release(self.active)
        self.active, self.mode, self._dirty = None, Mode.BASE, False

    def _composition(self, name: str) -> Target | None:
        target = self._compositions.get(name)
        return target if target is not None and target.composed else None

    def _versions(self, name: str) -> Versions:
        """The versions of the files `name` is read from now (reads their stamps): its
        file's, or a composition's recipe (as its newest request saw it) and members'."""
        comp = self._composition(name)
        if comp is None:
            return (self.store.stamp(name),)
        recipe = comp.versions[0] if comp.versions else None
        return (recipe, *(self.store.stamp(m) for m, _ in comp.members))

    def observe(self, target: Target) -> None:
        """When a request is admitted (never per step): learn what its key names, and
        mark the key's caches stale if the versions it was resolved against differ
        from theirs and the files on disk confirm it."""
        key = target.key
        if target.composed:
            if len(self._compositions) >= MAX_DEFINITIONS:
                self._compositions = {
                    k: t for k, t in self._compositions.items() if k in self._stamps
                }
            self._compositions[key] = target
        cached = self._stamps.get(key)
        if cached is None or key in self._stale or target.versions == cached:
            return
        if self._versions(key) != cached:
            self._stale.add(key)

    def stale(self, name: str) -> bool:
        """`name`'s files changed since its caches were made from them (as far as its
        requests and admin actions told: no file is read here)."""
        return name in self._stale

    def revalidate(self, name: str) -> None:
        """Read the stamps of `name`'s files (on loads and admin actions), and drop it
        from every tier if they changed since it was decoded (replaced behind the
        server's back); a version in use stays until released."""
        cached = self._stamps.get(name)
        if cached is not None and cached != self._versions(name):
            self._stale.add(name)
        self._drop_stale(name)

    def invalidate(self, name: str) -> None:
        """An admin action replaced `name`'s file: it, and every composition merged from
        it, is stale (dropped now, or when its running requests release it)."""
        keys = [name, *(k for k, t in self._compositions.items() if name in t.files)]
        for key in keys:
            if key in self._stamps:
                self._stale.add(key)
            self._drop_stale(key)

    def _drop_stale(self, name: str) -> None:
        if name not in self._stale:
            return
        if self.in_use(name):
            log.warning("%s changed on disk while in use: new requests get it when released", name)
            return
        log.info("%s changed on disk: reloading it", name)
        self.evict(name)

    def in_use(self, name: str) -> bool:
        if self.active == name and self.mode is Mode.MATERIALIZED:
            return True
        return any(e.in_use for t in self.tiers for e in t.list() if e.name == name)

    def _delta(self, name: str, plain: bool = False) -> Delta:
        """`name`'s decoded delta; a composition's is its members' merged. `plain`:
        a delta file, never a composition (a member)."""
        delta = self.host.get(name)
        if delta is None:
            comp = None if plain else self._composition(name)
            stamp: Versions
            if comp is None:
                stamp = (self.store.stamp(name),)
                delta = load_delta(
                    self.store.path(name), check=lambda meta: check_meta(meta, self.weights)
                )
            else:  # its members' deltas (each cached as itself), merged
                for m, _ in comp.members:
                    self.revalidate(m)  # a member changed on disk: its new file
                members = [(m, self._delta(m, plain=True), w) for m, w in comp.members]
                recipe = comp.versions[0] if comp.versions else None
                # the stamps of the member versions merged: if one was an older version
                # still in use, the composition is stale again and merged once more later
                stamp = (recipe, *(self._stamps.get(m, (None,))[0] for m, _ in comp.members))
                delta = merge(members, comp.method, comp.density, comp.seed, source=comp.key)
            self._stamps[name] = stamp
            self._touched[name] = tuple(delta.tensors)
            try:
                self.host.add(name, delta, delta.nbytes)
            except CacheFull:
                log.info("host tier full: %s stays uncached", name)
        return delta

    def bound(self, name: str) -> BoundDelta:
        """`name`'s delta bound to the resident weights (the device tier)."""
        bound = self.device_tier.get(name)
        if bound is None:
            bound = bind(self._delta(name), self.weights)
            try:
                self.device_tier.add(name, bound, bound.nbytes)
            except CacheFull:
                log.info("device tier full: %s stays uncached", name)
        return bound

    def _materialize(
        self, name: str, bound: BoundDelta, force: bool
    ) -> dict[str, torch.Tensor] | None:
        """Copies of the touched tensors with the delta in them; None when they don't fit.
        Needs the resident buffers to hold the base (the caller has deactivated)."""
        names = self._touched[name]
        nbytes = sum(self.params[n].numel() * self.params[n].element_size() for n in names)
        if not self._admit(name, nbytes, force):
            return None
        # room and memory first: a failure here has not touched the weights
        self.materialized.make_room(nbytes)
        tensors = {n: torch.empty_like(self.weights.tensor(n)) for n in names}
        self._dirty = True
        undo = apply_delta_(self.weights, bound)
        faults.point("materialize.applied")
        try:
            for n, t in tensors.items():
                t.copy_(self.weights.tensor(n))
        finally:
            revert_delta_(self.weights, undo)
        self._dirty = False
        self.materialized.add(name, tensors, nbytes)
        return tensors

    # ------------------------------------------------------------------ the invariant

    def check(self) -> None:
        """Verify the invariant (cheap: bindings and the undo stack, no data read);
        on a violation, restore the base (raises WeightsUnavailable if it cannot)."""
        if self.broken is not None:
            raise WeightsUnavailable(self.broken)
        problem = self._violation()
        if problem is not None:
            log.error("resident weights disagree with the engine (%s): restoring the base", problem)
            self.restore_base(verify=True)

    def _violation(self) -> str | None:
        depth = self.weights.applied_depth
        if depth != (1 if self.mode is Mode.INPLACE else 0):
            return f"{depth} deltas applied in mode {self.mode.value}"
        if self.mode is Mode.INPLACE and (
            self._undo is None or self.weights.innermost != self._undo.token
        ):
            return "the applied delta is not the active variant's"
        own: dict[str, int] = {}
        if self.mode is Mode.MATERIALIZED:
            tensors = self.materialized.peek(self.active or "")
            if tensors is None:
                return f"materialized {self.active!r} is not in its tier"
            own = {n: t.data_ptr() for n, t in tensors.items()}
        for n, p in self.params.items():
            if p.data_ptr() != own.get(n, self._ptrs[n]):
                return f"{n} is bound to the wrong tensor"
        return None

    def restore_base(self, verify: bool = True) -> None:
        """Put the base back: unbind any variant, revert what the undo log can, and
        (verify) check the bytes against the base's digest, reloading from disk if they
        differ. Raises WeightsUnavailable when the base cannot be restored."""
        self._rebind_base()
        if self.mode is Mode.MATERIALIZED and self.active is not None:
            self.materialized.release(self.active)
        if self.mode is Mode.INPLACE and self._undo is not None:
            try:
                revert_delta_(self.weights, self._undo)
            except Exception:
                log.exception("reverting %s failed", self.active)
        self.weights.forget_applied()
        self.active, self.mode, self._undo, self._dirty = None, Mode.BASE, None, False
        try:
            if not verify or digest(self.weights) == self.base_digest:
                return
            log.error("resident weights differ from the base: reloading it from %s", self.source)
            model = self.source.load_model(self.dtype)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self._views:
                        self._views[n].copy_(p.detach())
            ok = digest(self.weights) == self.base_digest
        except BaseException as e:  # unverified weights are never served
            self.broken = f"the base could not be verified or reloaded ({type(e).__name__})"
            log.exception("restoring the base failed")
            raise WeightsUnavailable(self.broken) from e
        if not ok:
            self.broken = "the reloaded base does not match its digest"
            raise WeightsUnavailable(self.broken)
        log.info("base restored from disk and verified")

    # ------------------------------------------------------------------ mixed steps

    def layout(self, name: str) -> Any:
        """`name`'s delta laid out for mixed steps (built from the host tier on a miss)."""
        from server.engine.sparse import layout_variant  # engine v2 only

        layout = self.layouts.get(name)
        if layout is None:
            delta = self._delta(name)
            layout = layout_variant(
                name,
                delta,
                self.matrix_names,
                self.fused_matrices,
                self.vector_slots,
                self.device,
            )
            try:
                self.layouts.add(name, layout, layout.nbytes)
            except CacheFull:
                log.info("mixed tier full: %s stays uncached", name)
                raise
        return layout

    def is_plain(self, name: str) -> bool:
        """`name` is a delta file of the store (not a composition)."""
        return self._composition(name) is None

    def load_plain(self, name: str) -> tuple[Any, Delta, Any]:
        """Read, verify, decode and lay out the delta file `name`: its stamp, delta and
        layout. What the loader thread runs: it reads the store and the resident
        weights' metadata (fixed at load) and touches no tier."""
        from server.engine.sparse import layout_variant  # engine v2 only

        stamp = self.store.stamp(name)
        delta = load_delta(self.store.path(name), check=lambda meta: check_meta(meta, self.weights))
        layout = layout_variant(
            name,
            delta,
            self.matrix_names,
            self.fused_matrices,
            self.vector_slots,
            self.device,
        )
        return stamp, delta, layout

    def adopt(self, name: str, stamp: Any, delta: Delta, layout: Any) -> bool:
        """Put what the loader made for `name` in the host and mixed tiers. False when
        its file changed since the load began, or the mixed tier has no room."""
        if name in self.layouts:
            return True  # made here meanwhile (a composition's member, a preload)
        if stamp is None or stamp != self.store.stamp(name):
            return False
        self._stamps[name] = (stamp,)
        self._touched[name] = tuple(delta.tensors)
        try:
            self.host.add(name, delta, delta.nbytes)
        except CacheFull:
            log.info("host tier full: %s stays uncached", name)
        try:
            self.layouts.add(name, layout, layout.nbytes)
        except CacheFull:
            return False
        return True

    def acquire_layout(self, name: str) -> Any:
        """Lay `name` out (if needed) and mark it in use by a running sequence (a stale
        version is dropped first when nothing else holds it)."""
        self._drop_stale(name)
        layout = self.layout(name)
        self.layouts.acquire(name)
        return layout

    def release_layout(self, name: str) -> None:
        self.layouts.release(name)

    def kept_entries(self, name: str) -> int:
        layout = self.layouts.get(name)
        return int(layout.count) if layout is not None else 0

    # ------------------------------------------------------------------ admin

    def tier_of(self, name: str) -> str:
        for tier in self.tiers:
            if name in tier:
                return tier.tier
        return "disk"

    def preload(self, name: str) -> Swap:
        """Bring `name` into the fastest tier that fits (it becomes the active one)."""
        self.revalidate(name)  # an admin action: the file on disk is read again
        if self.active == name and self.mode is Mode.INPLACE:
            self.activate(None)  # re-activate below, materialized if it fits
        return self.activate(name, force=True)

    def evict(self, name: str) -> None:
        """Drop `name` from every tier (pins are kept unless `forget` is called).
        Raises InUse, changing nothing, while running requests hold it."""
        if self.active == name:
            self.activate(None)
        if self.in_use(name):
            raise InUse(f"{name!r} is in use by running requests")
        for tier in self.tiers:
            tier.remove(name)
        self._touched.pop(name, None)
        self._uses.pop(name, None)
        self._stamps.pop(name, None)
        self._stale.discard(name)

    def forget(self, name: str) -> None:
        """Evict and unpin: the variant was deleted."""
        self.evict(name)
        self._compositions.pop(name, None)
        for tier in self.tiers:
            tier.unpin(name)

    def pin(self, name: str, pinned: bool) -> None:
        for tier in self.tiers:
            (tier.pin if pinned else tier.unpin)(name)

    def check_upload(self, path: Path) -> None:
        """Validate an uploaded file against the resident base (its metadata first, so
        a file for another model is refused before its payload is decoded)."""
        load_delta(path, check=lambda meta: check_meta(meta, self.weights))
