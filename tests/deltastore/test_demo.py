"""The shipped demos (deltastore/demo.py): a first run checks and copies them instead
of fine-tuning, and makes a demo only when no shipped file fits the base and recipe.
On the tiny base with files shipped for it here; the real ones are checked
end to end (-m e2e) against the embedded base."""

from __future__ import annotations

import shutil

import pytest

import deltastore.demo as demo_mod
from deltastore.compress import CompressOptions, compress
from deltastore.demo import DEMOS, compare, install_demos, shipped_delta, shipped_dir
from deltastore.format import load_delta, save_delta
from deltastore.methods import Method
from deltastore.sources import open_finetune, open_model
from deltastore.store import DeltaStore


@pytest.fixture
def shipped(tiny_dirs, tmp_path, monkeypatch):
    """A package data directory holding a delta of the tiny fine-tune under each demo's
    shipped name for the tiny base; fine-tuning fails the test."""
    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path / "cache"))
    ship = tmp_path / "ship"
    ship.mkdir()
    monkeypatch.setattr(demo_mod, "shipped_dir", lambda: ship)
    base = open_model(tiny_dirs["base"])
    opts = CompressOptions(method=Method.DAREX_Q, rate=0.9, q=0.2, progress=False)
    delta = compress(base, open_finetune(base, tiny_dirs["ft"]), opts)
    for demo in DEMOS:
        save_delta(ship / demo.cache_path(tiny_dirs["base"]).name, delta)

    def no_finetune(*args, **kwargs):
        raise AssertionError("a shipped demo was fine-tuned again")

    monkeypatch.setattr(demo_mod, "finetune", no_finetune)
    return ship


def test_shipped_demos_are_checked_and_copied(tiny_dirs, shipped, tmp_path):
    store = DeltaStore(tmp_path / "store")
    assert install_demos(tiny_dirs["base"], store, progress=False) == [d.name for d in DEMOS]
    for demo in DEMOS:
        path = shipped / demo.cache_path(tiny_dirs["base"]).name
        assert store.path(demo.name).read_bytes() == path.read_bytes()
    assert not (tmp_path / "cache" / "demo").exists()  # nothing was made


def test_a_shipped_demo_that_does_not_fit_is_made_instead(tiny_dirs, shipped, monkeypatch):
    demo, base = DEMOS[0], tiny_dirs["base"]
    path = shipped / demo.cache_path(base).name
    assert shipped_delta(demo, base) == path
    # another base: its fingerprint names other files
    assert shipped_delta(demo, tiny_dirs["ft"]) is None
    # a flipped byte: refused
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert shipped_delta(demo, base) is None
    # a file under the right name, made for another base: refused
    other = open_model(tiny_dirs["ft"])
    opts = CompressOptions(method=Method.DARE, rate=0.5, progress=False)
    save_delta(path, compress(other, open_finetune(other, tiny_dirs["base"]), opts))
    assert shipped_delta(demo, base) is None
    with pytest.raises(AssertionError, match="fine-tuned again"):  # so it is made
        demo_mod.demo_delta(demo, base, progress=False)


def test_compare_tells_identical_close_and_different(tiny_dirs, shipped):
    a = load_delta(next(shipped.iterdir()))
    assert compare(a, a)["identical"]
    base = open_model(tiny_dirs["base"])
    opts = CompressOptions(method=Method.DAREX_Q, rate=0.9, q=0.21, progress=False)
    b = compress(base, open_finetune(base, tiny_dirs["ft"]), opts)  # same mask, other q
    got = compare(b, a)
    assert got["same_positions"] and got["values_within_1pct"] == 1.0 and got["q"] == [0.21, 0.2]
    opts = CompressOptions(method=Method.DAREX_Q, rate=0.9, q=0.2, seed=1, progress=False)
    c = compress(base, open_finetune(base, tiny_dirs["ft"]), opts)  # another mask
    assert not compare(c, a)["same_positions"]


def test_the_package_ships_both_demos_within_4_mb():
    files = sorted(shipped_dir().glob("*.delta.safetensors"))
    assert sorted(f.name.rsplit("-", 1)[0] for f in files) == sorted(d.name for d in DEMOS)
    assert all(f.stat().st_size <= 4 * 1024 * 1024 for f in files)
    for f in files:
        assert load_delta(f).meta.source.startswith("demo:")


@pytest.mark.e2e
def test_the_shipped_demos_fit_the_embedded_base(embedded_base, tmp_path, monkeypatch):
    """What a first run does: both shipped files match the embedded base's fingerprint
    and the current recipes, so nothing is fine-tuned."""
    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_mod, "finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    for demo in DEMOS:
        assert shipped_delta(demo, embedded_base) is not None, demo.name
    store = DeltaStore(tmp_path / "store")
    assert install_demos(embedded_base, store, progress=False) == [d.name for d in DEMOS]
    shutil.rmtree(tmp_path / "store")


@pytest.mark.e2e
def test_rebuilding_the_demos_reproduces_the_shipped_files(embedded_base, tmp_path, monkeypatch):
    """`python -m deltastore.demo --rebuild`: each demo fine-tuned and compressed anew
    reproduces its shipped file. On the machine that made them the bytes are the
    same; elsewhere (another CPU's bf16 matmuls round differently) the documented
    tolerance: the same kept positions (the mask is seeded per tensor), q within
    one step of the fine grid (2^(1/8)), and 99% of the kept values within 1%."""
    from deltastore.demo import demo_delta

    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path / "cache"))
    for demo in DEMOS:
        shipped = shipped_delta(demo, embedded_base)
        assert shipped is not None, demo.name
        made = demo_delta(demo, embedded_base, progress=False, rebuild=True)
        assert made != shipped
        diff = compare(load_delta(made), load_delta(shipped))
        if diff["identical"]:
            continue
        assert diff["same_positions"], (demo.name, diff)
        q_made, q_shipped = diff["q"]
        assert abs(q_made / q_shipped - 1) <= 2 ** (1 / 8) - 1, (demo.name, diff)
        assert diff["values_within_1pct"] >= 0.99, (demo.name, diff)
