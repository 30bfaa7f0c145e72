"""Models and adapters by Hugging Face Hub id (deltastore/hub.py and the commands that
take a model): resolved offline against a Hub cache laid out in a temporary
directory, as `vllm serve org/name` resolves them. No test reaches a network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from peft import LoraConfig, get_peft_model

from deltastore.format import load_delta
from deltastore.hub import HubError, is_hub_id, resolve_ref
from deltastore.sources import LoraFinetune, SourceError, fingerprint, open_finetune, open_model
from server.cli import main
from tests.conftest import lay_out_hub, make_model, perturbed, save


def test_hub_ids_and_paths():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("org/name.v2")
    for bad in ("name", "a/b/c", "/abs/path", "./org/name", "org/..", "org/a--b", "~/x"):
        assert not is_hub_id(bad), bad


def test_a_local_path_wins_and_takes_no_revision(tmp_path, offline_hub, tiny_dirs):
    assert resolve_ref(tiny_dirs["base"]) == tiny_dirs["base"]
    with pytest.raises(SourceError, match="applies to a Hub id"):
        resolve_ref(tiny_dirs["base"], "main")
    with pytest.raises(SourceError, match="no such file or directory"):
        resolve_ref(tmp_path / "missing")
    # a relative directory named like a Hub id is that directory
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    shutil.copytree(tiny_dirs["base"], tmp_path / "org" / "tiny", dirs_exist_ok=True)
    lay_out_hub(offline_hub, "org/tiny", tiny_dirs["ft"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert resolve_ref("org/tiny").resolve() == (tmp_path / "org" / "tiny").resolve()


def test_a_hub_id_resolves_offline_at_its_revision(tmp_path, offline_hub, tiny_dirs):
    main_snap = lay_out_hub(offline_hub, "org/tiny", tiny_dirs["base"])
    v2 = lay_out_hub(offline_hub, "org/tiny", tiny_dirs["ft"], revision="v2")
    assert resolve_ref("org/tiny") == main_snap
    assert resolve_ref("org/tiny", "v2") == v2
    assert resolve_ref("org/tiny", v2.name) == v2  # a commit hash
    hub_files = sorted(p for p in offline_hub.rglob("*"))
    src = open_model(resolve_ref("org/tiny"))
    # the same bytes as the local directory: the same base for every delta
    assert fingerprint(src) == fingerprint(open_model(tiny_dirs["base"]))
    assert sorted(p for p in offline_hub.rglob("*")) == hub_files  # nothing written there
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        resolve_ref("org/absent")
    with pytest.raises(HubError, match="org/tiny@v9"):
        resolve_ref("org/tiny", "v9")


def _run(*argv: str) -> int:
    return main(list(argv))


def test_every_command_takes_a_hub_id(tmp_path, offline_hub, tiny_dirs, capsys):
    lay_out_hub(offline_hub, "org/tiny", tiny_dirs["base"])
    lay_out_hub(offline_hub, "org/tiny-ft", tiny_dirs["ft"], revision="release")
    out = tmp_path / "d.delta.safetensors"
    assert (
        _run(
            "compress",
            "org/tiny",
            "org/tiny-ft",
            "--finetuned-revision",
            "release",
            "-o",
            str(out),
            "--method",
            "dare",
            "--rate",
            "0.5",
        )
        == 0
    )
    local = tmp_path / "local.delta.safetensors"
    args = [str(tiny_dirs["base"]), str(tiny_dirs["ft"]), "--method", "dare", "--rate", "0.5"]
    assert _run("compress", *args, "-o", str(local)) == 0
    a, b = load_delta(out), load_delta(local)  # the same delta as from the local paths
    assert a.meta.base_fingerprint == b.meta.base_fingerprint
    assert all(a.tensors[n].values.equal(b.tensors[n].values) for n in b.tensors)
    capsys.readouterr()
    rec = ["recommend", "org/tiny", "org/tiny-ft", "--finetuned-revision", "release", "--json"]
    assert _run(*rec) == 0
    assert json.loads(capsys.readouterr().out)["method"]
    assert _run("materialize", "org/tiny", str(out), "-o", str(tmp_path / "m")) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert _run("merge", "org/tiny", str(out), "-o", str(tmp_path / "x.delta.safetensors")) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    ft = tmp_path / "ft"
    assert (
        _run(
            "finetune",
            "org/tiny",
            "--task",
            str(rows),
            "-o",
            str(ft),
            "--steps",
            "1",
            "--batch-size",
            "2",
        )
        == 0
    )
    assert (ft / "config.json").is_file()
    # a wrong revision or an id that is not cached: exit 2, saying why, nothing written
    capsys.readouterr()
    bad = tmp_path / "bad.delta.safetensors"
    assert (
        _run(
            "compress",
            "org/tiny",
            "org/tiny-ft",
            "-o",
            str(bad),
            "--rate",
            "0.5",
            "--method",
            "dare",
        )
        == 2
    )
    assert "org/tiny-ft" in capsys.readouterr().err and not bad.exists()
    assert (
        _run(
            "compress",
            "org/nope",
            "org/tiny-ft",
            "-o",
            str(bad),
            "--rate",
            "0.5",
            "--method",
            "dare",
        )
        == 2
    )
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_a_lora_adapter_by_hub_id(tmp_path, offline_hub, tiny_dirs):
    base = open_model(tiny_dirs["base"])
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base.load_model(), cfg).save_pretrained(tmp_path / "adapter")
    lay_out_hub(offline_hub, "org/tiny-lora", tmp_path / "adapter")
    ft = open_finetune(base, resolve_ref("org/tiny-lora"))
    local = open_finetune(base, tmp_path / "adapter")
    assert isinstance(ft, LoraFinetune)
    assert all(a.equal(b) for (_, a), (_, b) in zip(ft.deltas(), local.deltas(), strict=True))


def test_serve_help_and_a_subprocess_sees_the_environment(tmp_path, offline_hub, tiny_dirs):
    """HF_HOME and HF_HUB_OFFLINE reach a command run as a user runs it."""
    lay_out_hub(offline_hub, "org/tiny", tiny_dirs["base"])
    ft = save(perturbed(make_model(0), 0.05, seed=3), tmp_path / "ft")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "compress",
            "org/tiny",
            str(ft),
            "-o",
            str(tmp_path / "o.delta.safetensors"),
            "--method",
            "dare",
            "--rate",
            "0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "compress",
            "org/other",
            str(ft),
            "-o",
            str(tmp_path / "p.delta.safetensors"),
            "--method",
            "dare",
            "--rate",
            "0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "HF_HUB_OFFLINE is set" in res.stderr
