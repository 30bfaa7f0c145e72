"""Soak and disconnect checks on a live server (engine v2, tiny model): see
benchmarks/soak/, which runs the same checks longer from the command line
(`python -m benchmarks.soak`).

- 1,000 clients read the first chunk of a streaming completion and hang up: the server
  ends up holding nothing (queue, running set, KV slots, in-flight counts, layouts)
  and its memory stays flat;
- a soak (DELTASERVE_SOAK_S seconds, default 150): greedy completions of the base and
  12 variants, streaming and not, under admin churn (preload, evict, pin, unpin,
  replace, delete and re-upload, extra uploads) and bursts beyond the queue limit.
  Every 200 equals transformers' output for that variant, nothing answers 5xx, 429s
  come with the OpenAI error body, and memory stays flat.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.soak import (
    ADMIN_TOKEN,
    DISCONNECT_MAX_TOKENS,
    DISCONNECT_RSS_BOUND,
    MAX_TOKENS,
    PROMPTS,
    SOAK_RSS_BOUND,
    Variant,
    build_variants,
    fill_store,
    is_idle,
    run_disconnects,
    run_soak,
    soak_settings,
)
from server.app import ThreadedServer

SOAK_S = float(os.environ.get("DELTASERVE_SOAK_S", "150"))
DISCONNECTS = 1000


@pytest.fixture(scope="module")
def soak_variants(tiny_dirs, tmp_path_factory) -> list[Variant]:
    """The base, v0..v7 (stable), c0, c1 (deleted and re-uploaded) and x0, x1 (extra
    uploads), with references from transformers."""
    return build_variants(tiny_dirs["base"], tmp_path_factory.mktemp("soak"), progress=False)


def _serve(base: Path, variants: list[Variant], store: Path, **kw: object) -> ThreadedServer:
    fill_store(store, variants)
    srv = ThreadedServer(soak_settings(base, store, **kw))
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture
def disconnect_server(tiny_dirs, soak_variants, tmp_path) -> Iterator[ThreadedServer]:
    # a queue deeper than the clients at once: every one of them streams
    srv = _serve(tiny_dirs["base"], soak_variants, tmp_path / "store", queue_limit=64)
    yield srv
    srv.stop()


@pytest.fixture
def soak_server(tiny_dirs, soak_variants, tmp_path) -> Iterator[ThreadedServer]:
    # 4 running slots and a queue of 8: the bursts (32 at once) overflow it
    srv = _serve(tiny_dirs["base"], soak_variants, tmp_path / "store", queue_limit=8)
    yield srv
    srv.stop()


def test_1000_disconnects_mid_stream_leave_nothing_behind(disconnect_server, soak_variants):
    srv = disconnect_server
    stable = [v for v in soak_variants if not v.churn]
    rep = run_disconnects(
        srv.url, [v.name for v in stable], DISCONNECTS, 16, state=srv.state, progress=False
    )
    print(rep.summary())
    assert rep.refused == {} and rep.client_errors == 0, rep.to_dict()
    assert rep.mid_stream + rep.finished_first == DISCONNECTS
    assert rep.mid_stream >= 0.8 * DISCONNECTS  # a model or two may end at once
    # generation stopped at each hang-up: had the requests run to their end, the server
    # would have taken >= DISCONNECTS * DISCONNECT_MAX_TOKENS / 4 slots = 50,000 steps
    assert rep.steps is not None and rep.steps < DISCONNECTS * DISCONNECT_MAX_TOKENS / 4 / 10
    left = rep.leftovers
    assert left is not None and is_idle(left), left
    assert left["waiting"] == left["running"] == left["kv_used"] == 0 and not left["in_flight"]
    assert srv.state.scheduler.kv.used == 0
    assert rep.rss_growth_bytes < DISCONNECT_RSS_BOUND, rep.summary()
    # and the server still answers, exactly
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for v in stable[:3]:
            body = {"model": v.name, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
            r = client.post("/v1/completions", json={**body, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == v.refs[(PROMPTS[0], MAX_TOKENS)]


def test_soak_churn_and_overload(soak_server, soak_variants):
    srv = soak_server
    rep = run_soak(srv.url, ADMIN_TOKEN, soak_variants, SOAK_S, 8, state=srv.state, progress=False)
    print(rep.summary())
    ex = rep.examples
    assert rep.requests > 0 and rep.ok > 0.5 * (rep.requests - rep.rate_limited)
    assert rep.wrong == 0, ex.get("wrong")
    assert rep.server_errors == 0, ex.get("server_errors")
    assert rep.unexpected == {}, ex.get("unexpected")
    assert rep.client_errors == 0, ex.get("client_errors")
    assert rep.server_log_errors == 0, ex.get("server_log")
    # overload: every burst overflows the queue, and each 429 is an OpenAI error
    assert rep.rate_limited > 0 and rep.bursts > 0 and rep.bursts_with_429 == rep.bursts
    assert rep.bad_429_bodies == 0, ex.get("bad_429_bodies")
    # churn happened, and every admin call succeeded or was refused by design
    assert rep.admin_failures == {}, ex.get("admin_failures")
    kinds = {"preload", "evict", "pin", "unpin", "replace", "cycle-delete", "cycle-upload"}
    assert kinds | {"extra-upload", "extra-delete"} <= set(rep.admin_ops), rep.admin_ops
    assert rep.expected_404 > 0
    assert set(rep.per_model) == {v.name for v in soak_variants}  # every model answered
    # memory: flat after the warm-up, and nothing held once the traffic stopped
    assert rep.rss_growth_bytes < SOAK_RSS_BOUND, rep.summary()
    assert rep.leftovers is not None and is_idle(rep.leftovers), rep.leftovers
