import json
import subprocess
import sys

import pytest

from server.cli import main


def _run(*args):
    return main([str(a) for a in args])


def test_compress_inspect_recommend_materialize(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "bot.delta.safetensors"
    rc = _run(
        "compress",
        tiny_dirs["base"],
        tiny_dirs["ft"],
        "-o",
        out,
        "--method",
        "darex-q",
        "--rate",
        "0.9",
        "--q-search",
        "unlabelled",
        "--calib",
        tiny_dirs["calib"],
        "--calib-tokens",
        "256",
        "--seq-len",
        "64",
        "--q-step",
        "0.1",
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "q search (unlabelled)" in text and "<- chosen" in text
    assert "bytes per kept entry" in text

    assert _run("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "darex-q" and info["rate"] == 0.9 and info["kept"] > 0
    assert info["q_search"]["mode"] == "unlabelled"

    assert _run("inspect", out, "--tensors") == 0
    assert "model.embed_tokens.weight" in capsys.readouterr().out

    assert _run("recommend", tiny_dirs["base"], tiny_dirs["ft"]) == 0
    assert "recommended: --method" in capsys.readouterr().out

    assert _run("materialize", tiny_dirs["base"], out, "-o", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_errors_are_clear_and_exit_2(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "d.safetensors"
    assert (
        _run(
            "compress",
            tiny_dirs["base"],
            tiny_dirs["ft"],
            "-o",
            out,
            "--method",
            "dare",
            "--rate",
            "1.0",
        )
        == 2
    )
    assert "rate" in capsys.readouterr().err
    assert not out.exists()
    assert (
        _run(
            "compress",
            tiny_dirs["base"],
            tmp_path / "missing",
            "-o",
            out,
            "--method",
            "dare",
            "--rate",
            "0.5",
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    assert _run("inspect", tmp_path / "junk.safetensors") == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(
            "compress",
            tiny_dirs["base"],
            tiny_dirs["ft"],
            "-o",
            out,
            "--method",
            "ties",
            "--rate",
            "0.5",
        )
    assert "darex-q" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "d.safetensors"
    args = [
        "compress",
        tiny_dirs["base"],
        tiny_dirs["ft"],
        "-o",
        out,
        "--method",
        "dare",
        "--rate",
        "0.5",
    ]
    assert _run(*args) == 0
    assert _run(*args) == 2
    assert "--force" in capsys.readouterr().err
    assert _run(*args, "--force") == 0


@pytest.mark.parametrize(
    "cmd",
    [[], ["compress"], ["inspect"], ["recommend"], ["materialize"], ["merge"], ["eval"], ["serve"]],
)
def test_help(cmd):
    res = subprocess.run(
        [sys.executable, "-m", "server.cli", *cmd, "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "usage: deltaserve" in res.stdout


def test_recommend_gives_the_advice_first_and_tensors_on_request(tiny_dirs, capsys):
    assert _run("recommend", tiny_dirs["base"], tiny_dirs["ft"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("recommended: --method ") and "--rate 0.99" in out[0]
    assert out[1].startswith("  method: ") and out[2].startswith("  rate: ")
    assert len(out) < 10 and not any("down_proj" in line for line in out)
    assert _run("recommend", tiny_dirs["base"], tiny_dirs["ft"], "--tensors") == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if ".weight" in line]
    assert "model.layers.0.mlp.down_proj.weight" in names
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers)  # natural order: layers.2 before layers.10


def test_version():
    res = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"], capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.startswith("deltaserve ")


def test_materialize_force_replaces_only_a_model_directory(tmp_path, tiny_dirs, capsys):
    delta = tmp_path / "d.delta.safetensors"
    args = ["compress", tiny_dirs["base"], tiny_dirs["ft"], "-o", delta, "--method", "dare"]
    assert _run(*args, "--rate", "0.5") == 0
    out = tmp_path / "hf"
    assert _run("materialize", tiny_dirs["base"], delta, "-o", out) == 0
    first = (out / "model.safetensors").read_bytes()
    assert _run("materialize", tiny_dirs["base"], delta, "-o", out) == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "other.delta.safetensors"
    assert _run(*args[:4], other, *args[5:], "--rate", "0.9", "--seed", "3") == 0
    assert _run("materialize", tiny_dirs["base"], other, "-o", out, "--force") == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert _run("materialize", tiny_dirs["base"], delta, "-o", notes, "--force") == 2
    assert "not a model directory" in capsys.readouterr().err
    assert (notes / "todo.txt").read_text() == "mine"


def test_finetune_then_compress_with_its_calibration_text(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "ft"
    args = ["finetune", tiny_dirs["base"], "--task", "arith", "-o", out, "--steps", "2"]
    assert _run(*args, "--examples", "16", "--batch-size", "4") == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # the held-out prompts as the fine-tune sees them: chat format, no answers
    calib = (out / "calib.txt").read_text().split("<assistant>")[:-1]
    assert len(calib) == 64 and all("<user>What is" in prompt for prompt in calib)  # val split
    assert "only.\n" in calib[0] and "only. " not in calib[0]
    delta = tmp_path / "ft.delta.safetensors"
    rc = _run(
        "compress",
        tiny_dirs["base"],
        out,
        "-o",
        delta,
        "--method",
        "darex-q",
        "--rate",
        "0.9",
        "--q-search",
        "unlabelled",
        "--calib",
        out / "calib.txt",
    )
    assert rc == 0 and delta.is_file()
    assert _run(*args) == 2  # exists
    assert "--force" in capsys.readouterr().err
    rows = tmp_path / "mine.jsonl"
    rows.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n')
    mine = ["finetune", tiny_dirs["base"], "--task", rows, "-o", tmp_path / "mine"]
    assert _run(*mine, "--steps", "1", "--batch-size", "2") == 0
    assert _run("finetune", tiny_dirs["base"], "--task", "nope", "-o", tmp_path / "x") == 2
    assert "not a built-in task" in capsys.readouterr().err


def test_compress_mix_with_a_q_per_depth_group(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "mix.delta.safetensors"
    args = ["compress", tiny_dirs["base"], tiny_dirs["ft"], "-o", out, "--rate", "0.9"]
    args += ["--method", "mix", "--mix-top", "0.3", "--q-search", "unlabelled"]
    args += ["--q-groups", "depth", "--calib", tiny_dirs["calib"], "--calib-tokens", "128"]
    assert _run(*args, "--seq-len", "64") == 0
    text = capsys.readouterr().out
    assert "then one q per depth group" in text and "layers 0-0" in text
    assert "mix (top 0.3)" in text
    assert _run("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "mix" and info["mix_top"] == 0.3
    assert info["q_search"]["groups"]["by"] == "depth"
    bad = ["compress", tiny_dirs["base"], tiny_dirs["ft"], "-o", tmp_path / "x.safetensors"]
    assert _run(*bad, "--rate", "0.9", "--method", "dare", "--q-groups", "module") == 2
    assert "q-groups refines" in capsys.readouterr().err
    assert _run(*bad, "--rate", "0.9", "--method", "mix", "--mix-top", "1") == 2
    assert "top share" in capsys.readouterr().err


def test_finetune_defaults_to_the_demos_fast_settings(tmp_path, tiny_dirs, monkeypatch):
    """By default the embedding stays the base's and bf16 autocast follows the CPU;
    --no-freeze-embeddings trains it, --bf16 / --no-bf16 force it."""
    import deltastore.finetune as ft_mod
    from deltastore.sources import open_model

    seen = []
    real = ft_mod.finetune

    def spy(base, rows, out, cfg, **kw):
        seen.append(cfg)
        return real(base, rows, out, cfg, **kw)

    monkeypatch.setattr(ft_mod, "finetune", spy)
    common = ["--task", "arith", "--steps", "2", "--examples", "16", "--batch-size", "4"]
    args = ["finetune", tiny_dirs["base"], *common]
    assert _run(*args, "-o", tmp_path / "a", "--lr", "1e-2") == 0
    assert _run(*args, "-o", tmp_path / "b", "--lr", "1e-2", "--no-freeze-embeddings") == 0
    assert _run(*args, "-o", tmp_path / "c", "--bf16") == 0
    assert _run(*args, "-o", tmp_path / "d", "--no-bf16") == 0
    assert seen[0].bf16 == ft_mod.native_bf16() and not seen[0].train_embeddings
    assert seen[1].train_embeddings and seen[2].bf16 and not seen[3].bf16
    name = "model.embed_tokens.weight"
    base = open_model(tiny_dirs["base"]).get(name)
    assert open_model(tmp_path / "a").get(name).equal(base)  # frozen
    assert not open_model(tmp_path / "b").get(name).equal(base)  # trained
