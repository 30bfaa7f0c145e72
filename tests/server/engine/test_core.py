"""Engine admission to the materialized tier: frequency-aware, so one-off variants
do not evict hot ones; the base's digest, taken in the background."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from deltastore.sources import open_model
from deltastore.store import DeltaStore
from server.engine.core import Engine, Mode
from tests.server.conftest import make_settings


def _engine(tiny_dirs, variant_files, tmp_path, **kw) -> Engine:
    store = tmp_path / "store"
    store.mkdir(parents=True)
    for name, path in variant_files.items():
        shutil.copy(path, store / f"{name}.delta.safetensors")
    settings = make_settings(tiny_dirs["base"], store, **kw)
    return Engine(open_model(tiny_dirs["base"]), DeltaStore(store), settings)


def test_second_use_materializes_and_tail_variants_do_not_evict_hot_ones(
    tiny_dirs, variant_files, tmp_path
):
    e = _engine(tiny_dirs, variant_files, tmp_path)  # budget: one materialized variant
    assert e.activate("v0").mode is Mode.INPLACE  # first use: in place
    assert e.activate("v1").mode is Mode.INPLACE
    assert e.activate("v0").mode is Mode.MATERIALIZED  # second use: admitted (room free)
    assert e.activate("v0").switched is False
    e.activate("v0")
    assert e.activate("v2").mode is Mode.INPLACE
    assert e.activate("v2").switched is False
    e.activate(None)
    # v2 now has 2 uses, v0 has 2 (the repeats of the active variant do not count):
    # not more than the victim, so v2 stays in place and v0 stays materialized
    assert e.activate("v2").mode is Mode.INPLACE
    assert "v0" in e.materialized
    # used more often than v0, v2 is admitted and v0 evicted
    e.activate(None)
    assert e.activate("v2").mode is Mode.MATERIALIZED
    assert "v0" not in e.materialized


def test_materialize_after_one_and_explicit_preload(tiny_dirs, variant_files, tmp_path):
    e = _engine(tiny_dirs, variant_files, tmp_path, materialize_after=1)
    assert e.activate("v0").mode is Mode.MATERIALIZED
    e2 = _engine(tiny_dirs, variant_files, tmp_path / "b")
    assert e2.preload("v3").mode is Mode.MATERIALIZED  # admin preload forces admission


def test_switching_back_to_base_is_bit_exact(tiny_dirs, variant_files, tmp_path):
    e = _engine(tiny_dirs, variant_files, tmp_path)
    src = open_model(tiny_dirs["base"])
    for name in ["v0", "v1", "v0", "v0", "v2", "v1", "v0", None, "v3", "v4", None]:
        e.activate(name)
    for n, p in e.params.items():
        assert torch.equal(p.detach(), src.get(n)), n


def test_the_base_digest_is_taken_in_the_background_before_any_write(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    """Loading does not wait for the digest (an 8B base's takes ~10 s); the first
    write to the weights does, so the digest is of the base as loaded."""
    import server.engine.core as core

    release = threading.Event()
    real = core.digest

    def slow(weights, lock=None):
        release.wait(30)
        return real(weights, lock)

    monkeypatch.setattr(core, "digest", slow)
    e = _engine(tiny_dirs, variant_files, tmp_path)  # returns: the digest is pending
    assert not e._digest.ready
    want = real(e.weights)
    swap = ThreadPoolExecutor(1).submit(e.activate, "v0")
    time.sleep(0.3)
    assert not swap.done() and real(e.weights) == want  # the write waits
    release.set()
    assert swap.result(30).switched
    assert e.base_digest == want and e._digest.ready
    e.activate(None)
    assert real(e.weights) == e.base_digest


def test_the_base_fingerprint_is_taken_in_the_background_before_any_check(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    """A first start (no cached fingerprint beside the base) does not wait for it;
    loading a delta, which is checked against it, does."""
    import server.engine.core as core

    release = threading.Event()
    real = core.fingerprint

    def slow(source):
        release.wait(30)
        return real(source)

    monkeypatch.setattr(core, "fingerprint", slow)
    e = _engine(tiny_dirs, variant_files, tmp_path)
    assert e.known_fingerprint() is None
    swap = ThreadPoolExecutor(1).submit(e.activate, "v0")
    time.sleep(0.3)
    assert not swap.done()
    release.set()
    assert swap.result(30).switched
    assert e.fingerprint == e.known_fingerprint() == e.weights.fingerprint
    assert e.fingerprint == real(open_model(tiny_dirs["base"]))


def test_the_swap_calibration_never_permutes_the_whole_weights(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    """The startup swap timing draws its positions without a permutation of the
    resident buffer (8 bytes per weight: 10 GB and minutes for a 1B base, before
    /ready), and its zero delta leaves every bit of the base as it was."""
    from server.engine import policy

    e = _engine(tiny_dirs, variant_files, tmp_path)
    before = [b.clone() for b in e.weights.buffers]
    largest = max(b.numel() for b in e.weights.buffers)
    randperm = torch.randperm

    def bounded(n, *args, **kwargs):
        assert n < largest, f"randperm({n}) over the whole weights"
        return randperm(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", bounded)
    seconds = policy._measure_swap(e)
    assert 0 < seconds < 1e-3
    assert all(torch.equal(b, a) for b, a in zip(e.weights.buffers, before, strict=True))
