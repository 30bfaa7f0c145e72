"""The fidelity estimate: what compress records and prints, its refusal below the
threshold, and recommend's walk over the rates."""

import json
import math
import random
from dataclasses import replace

import pytest

from deltastore.calib import DEFAULT_OBJECTIVE, FALLBACK_OBJECTIVE, Example
from deltastore.compress import CompressOptions, Compressor, compress
from deltastore.fidelity import (
    THRESHOLD,
    Estimate,
    RateRow,
    format_rates,
    highest_rate,
    most_kept,
)
from deltastore.finetune import FinetuneConfig, finetune, format_prompt
from deltastore.format import DeltaMeta, load_delta
from deltastore.methods import Method
from deltastore.qsearch import QSearch
from deltastore.recommend import delta_stats, recommend
from deltastore.sources import open_finetune, open_model
from server.cli import main
from tests.conftest import make_model, save, tiny_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran"]


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    """A tiny base and a fine-tune of it that answers every prompt with "ok": a
    decisive change (the base never says it) that a high drop rate destroys; and
    calibration text of held-out chat prompts."""
    root = tmp_path_factory.mktemp("decisive")
    base_dir = save(make_model(0), root / "base")
    rng = random.Random(0)

    def prompt():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    train = [Example(prompt(), "ok") for _ in range(64)]
    cfg = FinetuneConfig(steps=12, lr=1e-2, batch_size=8, max_len=32)
    ft_dir = finetune(base_dir, train, root / "ft", cfg, progress=False)
    calib = root / "calib.txt"
    calib.write_text("\n".join(format_prompt(tiny_tokenizer(), prompt(), True) for _ in range(40)))
    return {"base": base_dir, "ft": ft_dir, "calib": calib, "root": root}


def _opts(d, rate, **kw):
    kw = {"q_search": QSearch.UNLABELLED, **kw}
    return CompressOptions(
        Method.DAREX_Q,
        rate,
        calib=d["calib"],
        calib_tokens=256,
        seq_len=64,
        progress=False,
        **kw,
    )


def _pair(d):
    base = open_model(d["base"])
    return base, open_finetune(base, d["ft"])


def test_the_estimate_falls_with_the_rate_and_is_whole_without_pruning(decisive):
    base, ft = _pair(decisive)
    run = Compressor(base, ft)
    kept = {}
    for rate in (0.0, 0.5, 0.99):
        opts = _opts(decisive, rate) if rate else _opts(decisive, rate, q_search=None, q=1.0)
        meta = run(opts).meta
        if rate:  # the default objective: the KL on the fine-tune's replies
            assert meta.q_search["objective"] == DEFAULT_OBJECTIVE.value.replace("-", "_")
        fid = meta.fidelity
        assert fid is not None
        est = Estimate.from_dict(fid)
        assert est.continuations >= 8 and est.finetune == 1.0 and est.base == 0.0
        assert est.shift > 1.0  # the fine-tune moved decisively where it says "ok"
        kept[rate] = est.kept
    assert kept[0.0] == 1.0  # every entry kept: the variant is the fine-tune (bf16 values)
    assert kept[0.99] < THRESHOLD <= kept[0.5]
    assert kept[0.99] <= 0.1  # destroyed


def test_compress_refuses_a_destroyed_variant_without_force(decisive, tmp_path, capsys):
    out = tmp_path / "ok.delta.safetensors"
    args = ["compress", decisive["base"], decisive["ft"], "-o", out, "--rate", "0.99"]
    args += ["--q-search", "unlabelled", "--calib", decisive["calib"]]
    args += ["--calib-tokens", "256", "--seq-len", "64"]
    args = [str(a) for a in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert not out.exists()
    err = captured.err
    assert "not written" in err and f"below {THRESHOLD:.0%}" in err and "--force" in err
    # it names the rate recommend picks, below the one asked for, and prints its table
    named = float(err.split("--rate ")[1].split()[0])
    assert named < 0.99
    assert "fidelity estimate: keeps ~" in captured.out and "BELOW 50%" in captured.out
    table = [line for line in captured.out.splitlines() if "<- picked" in line]
    assert len(table) == 1 and float(table[0].split()[0]) == named

    assert main([*args, "--force"]) == 0
    assert out.is_file() and "BELOW 50%" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fidelity"]["kept"] < THRESHOLD and info["fidelity"]["continuations"] >= 8
    assert main(["inspect", str(out)]) == 0
    assert "BELOW 50%" in capsys.readouterr().out


def test_a_kept_variant_is_written_and_no_estimate_without_calibration(decisive, tmp_path, capsys):
    out = tmp_path / "half.delta.safetensors"
    args = ["compress", decisive["base"], decisive["ft"], "-o", out, "--rate", "0.5"]
    args += ["--q-search", "unlabelled", "--calib", decisive["calib"], "--calib-tokens", "256"]
    assert main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "fidelity estimate: keeps ~" in text and "BELOW" not in text
    plain = tmp_path / "dare.delta.safetensors"
    args = ["compress", decisive["base"], decisive["ft"], "-o", plain, "--method", "dare"]
    assert main([str(a) for a in [*args, "--rate", "0.99"]]) == 0  # nothing to tell by
    assert "fidelity estimate: none (it needs --calib" in capsys.readouterr().out
    assert load_delta(plain).meta.fidelity is None


def test_no_estimate_when_the_finetune_barely_moves(tiny_dirs):
    """A small random perturbation of a random model changes only near-ties: nothing
    decisive to keep, so no estimate and no refusal."""
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, tiny_dirs["ft"])
    opts = CompressOptions(
        Method.DAREX_Q, 0.99, q=0.05, calib=tiny_dirs["chat_calib"], calib_tokens=256
    )
    est = Estimate.from_dict(compress(base, ft, replace(opts, progress=False)).meta.fidelity)
    assert est.continuations == 32 and est.base < est.finetune  # its replies differ ...
    assert est.kept is None and est.shift < 0.5 and not est.below  # ... by near-ties
    assert "barely moves" in est.describe()


def test_no_estimate_without_prompts_in_the_chat_format(decisive, tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text(" ".join(WORDS * 40))  # task text, but no prompt to reply to
    out = tmp_path / "raw.delta.safetensors"
    args = ["compress", decisive["base"], decisive["ft"], "-o", out, "--rate", "0.99"]
    assert main([str(a) for a in [*args, "--q-search", "unlabelled", "--calib", raw]]) == 0
    assert "holds no prompt in the chat format" in capsys.readouterr().out
    stored = load_delta(out).meta
    assert stored.fidelity is None
    # the default objective needs replies to prompts: on this text it is the KL
    assert stored.q_search["objective"] == FALLBACK_OBJECTIVE.value.replace("-", "_")
    bad = [*args, "--force", "--q-search", "unlabelled", "--q-objective", "agreement"]
    assert main([str(a) for a in [*bad, "--calib", raw]]) == 2
    assert "no prompt in the chat format" in capsys.readouterr().err


def test_recommend_picks_the_highest_rate_keeping_90_percent(decisive):
    base, ft = _pair(decisive)
    rec = recommend(delta_stats(ft, progress=False), low_rank=False)
    template = _opts(decisive, 0.5)
    rates = (0.99, 0.9, 0.5, 0.2, 0.0)
    picked = rec.by_estimate(Compressor(base, ft), template, rates)
    rows = picked.estimates
    assert [r.rate for r in rows] == sorted((r.rate for r in rows), reverse=True)
    hit = next(r for r in rows if r.rate == picked.rate)
    assert hit.estimate.kept >= 0.9
    above = [r for r in rows if r.rate > picked.rate]
    assert above and all(r.estimate.kept < 0.9 for r in above)  # 0.99 does not keep it
    assert "the highest rate" in picked.rate_reason
    # the rate and its estimate hold when compress runs the flags recommend prints
    again = compress(base, ft, picked.options(template, picked.rate))
    assert Estimate.from_dict(again.meta.fidelity).kept == hit.estimate.kept


def test_recommend_cli_prints_the_table_it_decided_from(decisive, capsys):
    args = ["recommend", decisive["base"], decisive["ft"], "--calib", decisive["calib"]]
    assert main([str(a) for a in [*args, "--calib-tokens", "256", "--seq-len", "64"]]) == 0
    out = capsys.readouterr().out
    assert "fidelity estimate at each rate tried" in out
    picked = float(out.splitlines()[0].split("--rate ")[1])
    rows = [line.split() for line in out.splitlines() if line.strip().endswith("picked")]
    assert len(rows) == 1 and float(rows[0][0]) == picked
    assert "0.999" in out  # the walk starts at the highest rate


KEPT = {0.999: 0.2, 0.998: 0.3, 0.995: 0.5, 0.99: 0.8, 0.98: 0.85, 0.95: 0.93, 0.9: 1.0}


def _at(seen, kept=KEPT):
    def at(rate):
        seen.append(rate)
        return Estimate(kept[rate], kept[rate], 0.0, 1.0, 32, kept[rate]), 0.01, 1.0

    return at


@pytest.mark.parametrize("first_ok", [0.999, 0.995, 0.98, 0.95, 0.9, None])
def test_highest_rate_finds_the_highest_rate_that_keeps_the_target(first_ok):
    kept = {r: (1.0 if first_ok is not None and r <= first_ok else 0.5) for r in KEPT}
    seen = []
    picked, rows = highest_rate(_at(seen, kept), list(KEPT))
    assert picked == first_ok
    assert seen[0] == 0.999  # the highest first: an ordinary delta stops there
    assert len(seen) <= 1 + math.ceil(math.log2(len(KEPT))) + 1  # then a bisection
    assert [r.rate for r in rows] == sorted(seen, reverse=True)


def test_the_table_marks_the_pick_and_says_when_none_keeps_the_target():
    seen = []
    picked, rows = highest_rate(_at(seen), (0.9, 0.999, 0.95, 0.99))
    assert picked == 0.95
    lines = format_rates(rows, picked).splitlines()
    assert [line.split()[0] for line in lines[1:]] == [str(r.rate) for r in rows]
    assert "<- picked" in next(line for line in lines if line.split()[0] == "0.95")
    none, rows = highest_rate(_at([]), (0.999, 0.99), target=0.9)
    assert none is None and most_kept(rows).rate == 0.99
    assert "no rate tried keeps 90%" in format_rates(rows, 0.99)
    with pytest.raises(ValueError, match="no rate"):
        highest_rate(_at([]), ())


def test_estimates_round_trip_and_old_files_have_none():
    est = Estimate(0.75, 0.78, 0.125, 1.0, 32, 0.9, 4.2)
    assert Estimate.from_dict(json.loads(json.dumps(est.as_dict()))) == est
    none = Estimate(None, 0.1, 0.1, 1.0, 32, math.nan, 0.05)
    back = Estimate.from_dict(json.loads(json.dumps(none.as_dict())))  # NaN -> null -> NaN
    assert back.kept is None and back.shift == 0.05 and math.isnan(back.tokens)
    assert not none.below and "barely moves" in none.describe()
    old = DeltaMeta(base_fingerprint="sha256:x", method="dare", rate=0.9)
    assert old.fidelity is None
    assert replace(RateRow(0.9, None, None, 0.0)).estimate is None
