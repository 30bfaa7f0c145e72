"""Any fine-tune -> a delta with recommend's defaults (deltastore/auto.py), on the
tiny base: what vLLM's load_lora_adapter and --lora-modules run."""

from __future__ import annotations

import os
import shutil

import pytest

from deltastore.apply import BaseMismatchError
from deltastore.auto import general_calibration, is_delta_file, stamp, to_delta
from deltastore.compress import CompressOptions, compress
from deltastore.format import save_delta
from deltastore.methods import Method
from deltastore.sources import SourceError, open_finetune, open_model


def test_a_full_finetune_gets_recommends_method_and_its_own_calibration(tiny_dirs, tmp_path):
    base = open_model(tiny_dirs["base"])
    delta = to_delta(base, tiny_dirs["ft"], "ref")
    assert delta.meta.source == "ref" and delta.meta.method == "darex-q"
    assert delta.meta.rate >= 0.99 and delta.meta.q_search["mode"] == "unlabelled"
    assert general_calibration().read_text().count(" ") > 500
    ft = tmp_path / "ft"
    shutil.copytree(tiny_dirs["ft"], ft)
    (ft / "calib.txt").write_text("the cat " * 300)  # its own text: another q curve
    own = to_delta(base, ft, "ref")
    assert own.meta.q_search["values"] != delta.meta.q_search["values"]


def test_a_delta_file_is_taken_as_it_is_for_its_own_base_only(tiny_dirs, tmp_path):
    base, other = open_model(tiny_dirs["base"]), open_model(tiny_dirs["ft"])
    opts = CompressOptions(method=Method.DARE, rate=0.5, progress=False)
    path = tmp_path / "d.delta.safetensors"
    save_delta(path, compress(base, open_finetune(base, tiny_dirs["ft"]), opts))
    assert is_delta_file(path) and not is_delta_file(tiny_dirs["ft"] / "config.json")
    got = to_delta(base, path)
    assert got.meta.method == "dare" and got.meta.rate == 0.5
    with pytest.raises(BaseMismatchError, match="another base"):
        to_delta(other, path)
    with pytest.raises(SourceError):
        to_delta(base, tiny_dirs["ft"] / "config.json")  # a file, neither delta nor GGUF


def test_stamp_follows_the_content(tiny_dirs, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_dirs["ft"], ft)
    first = stamp(ft)
    assert stamp(ft) == first
    cfg = ft / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert stamp(ft) != first
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert len({first, stamp(ft)}) == 2
