"""`deltaserve loadtest` against a live server on 127.0.0.1 (bounded, self-stopping)."""

from __future__ import annotations

import json
import random

import pytest

from server.cli import main
from server.clients.loadtest import parse_mix, scrape


def test_mixes():
    rng = random.Random(0)
    zipf = parse_mix("zipf:1.0", ["a", "b", "c", "d"])
    assert zipf.weights == (1.0, 0.5, 1 / 3, 0.25)
    counts = {m: 0 for m in "abcd"}
    for _ in range(4000):
        counts[zipf.sample(rng)] += 1
    assert counts["a"] > counts["b"] > counts["c"] > counts["d"] > 0
    assert parse_mix("uniform", ["a", "b"]).weights == (1.0, 1.0)
    w = parse_mix("weights:a=3,b=1", ["a", "b", "c"])
    assert w.models == ("a", "b") and w.weights == (3.0, 1.0)
    for bad in ("weights:z=1", "weights:a=x", "zipf:-1", "pareto"):
        with pytest.raises(ValueError):
            parse_mix(bad, ["a", "b"])
    with pytest.raises(ValueError, match="no models"):
        parse_mix("uniform", [])


def test_scrape_sums_over_labels():
    text = (
        'deltaserve_swap_seconds_count{mode="inplace"} 3.0\n'
        'deltaserve_swap_seconds_count{mode="materialized"} 2.0\n'
        'deltaserve_cache_hits_total{tier="host"} 5.0\n'
        "# HELP something\n"
        "deltaserve_step_seconds_sum 1.5\n"
        "deltaserve_step_seconds_count 3.0\n"
        'deltaserve_layout_loads_total{where="loader",outcome="ok"} 4.0\n'
        'deltaserve_layout_loads_total{where="step",outcome="ok"} 1.0\n'
    )
    got = scrape(text)
    assert got["swaps"] == 5.0 and got["cache_hits"] == 5.0 and got["cache_evictions"] == 0.0
    assert got["step_seconds"] == 1.5 and got["step_rows"] == 0.0
    assert got["layout_loads"] == 5.0 and got["layout_wait_seconds"] == 0.0


def test_closed_loop_report_json_and_plot(live, tmp_path, capsys):
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    rc = main(
        [
            "loadtest",
            "--url",
            live.url,
            "--models",
            "all",
            "--distribution",
            "zipf:1.0",
            "--concurrency",
            "4",
            "--requests",
            "24",
            "--max-tokens",
            "6",
            "--stream",
            "--out",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "succeeded 24" in text and "p99" in text
    rep = json.loads(out.read_text())
    assert rep["sent"] == rep["succeeded"] == 24 and rep["failed_by_status"] == {}
    assert sum(rep["per_model"].values()) == 24 and len(rep["per_model"]) >= 3
    assert rep["tokens_per_s"] > 0 and rep["ttft_ms"]["p50"] <= rep["e2e_ms"]["p99"]
    assert rep["server"]["generated_tokens"] > 0
    assert rep["server"]["steps"] > 0  # many variants per step: it steps
    # every step computed at least one token, and the tokens generated were computed
    assert rep["server"]["step_rows"] >= max(rep["server"]["steps"], 24 * 6)
    assert rep["server"]["step_seconds"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_stops_by_itself(live, capsys):
    rc = main(
        [
            "loadtest",
            "--url",
            live.url,
            "--models",
            "v0,v1",
            "--rate",
            "40",
            "--duration",
            "1.0",
            "--max-tokens",
            "4",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "open loop, 40.0 req/s" in out
    sent = int(out.split("sent ")[1].split(",")[0])
    assert 10 <= sent <= 100  # ~40 Poisson arrivals in one second


def test_failures_are_counted_by_status(live, capsys):
    rc = main(
        [
            "loadtest",
            "--url",
            live.url,
            "--models",
            "v0,missing",
            "--concurrency",
            "2",
            "--requests",
            "10",
            "--distribution",
            "weights:v0=1,missing=1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "'404'" in out


def test_bad_arguments(live, capsys):
    assert main(["loadtest", "--url", live.url, "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 2
    assert "cannot list models" in capsys.readouterr().err


def test_a_run_that_generates_nothing_fails_loudly(live, capsys, monkeypatch):
    """A model that ends at once: without ignore_eos the run measured nothing, and
    says so with exit 1; with it (the default) every request generates its tokens."""
    everything = set(range(live.state.engine.model.config.vocab_size))
    monkeypatch.setattr(live.state.scheduler, "eos", everything)
    args = ["loadtest", "--url", live.url, "--models", "v0", "--requests", "4"]
    assert main([*args, "--max-tokens", "5", "--no-ignore-eos"]) == 1
    captured = capsys.readouterr()
    assert "generated 0 tokens" in captured.err and "measured" in captured.err
    # the default asks every request for its tokens: 4 requests x 5 tokens
    assert main([*args, "--max-tokens", "5", "--stream"]) == 0
    text = capsys.readouterr().out
    assert float(text.split("req/s, ")[1].split(" generated")[0]) > 0


def test_mixed_prompts_from_a_file_and_ttft_only_when_streaming(live, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "the cat", "max_tokens": 3}\n\n{"prompt": "a", "max_tokens": 7}\n'
    )
    out = tmp_path / "r.json"
    args = ["loadtest", "--url", live.url, "--models", "v0,v1", "--requests", "16"]
    assert main([*args, "--prompts", str(prompts), "--out", str(out)]) == 0
    assert "ttft       not measured" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert {r["tokens"] for r in rep["results"]} == {3, 7}  # each its own max_tokens
    assert all(r["ttft"] is None for r in rep["results"])
    assert main([*args, "--prompts", str(prompts), "--stream", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert all(r["ttft"] is not None and r["ttft"] <= r["e2e"] for r in rep["results"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert main([*args, "--prompts", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path, capsys):
    import sys

    from tests.conftest import free_port

    out = tmp_path / "report.json"
    args = ["loadtest", "--url", f"http://127.0.0.1:{free_port()}", "--models", "m"]
    args += ["--requests", "50", "--out", str(out), "--plot"]
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        rc = main([*args, str(tmp_path / "r.png")])
        err = capsys.readouterr()
        assert rc == 2 and "--plot needs matplotlib" in err.err
        assert "sent" not in err.out and not out.exists()  # nothing was run or written
    # with matplotlib: a PNG whose directory does not exist fails before the run too
    rc = main([*args, str(tmp_path / "missing" / "r.png")])
    err = capsys.readouterr()
    assert rc == 2 and "no directory" in err.err and not out.exists()
