"""Engine admission to the materialized tier: frequency-aware, so one-off variants
do not evict hot ones."""

from __future__ import annotations

import shutil

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
