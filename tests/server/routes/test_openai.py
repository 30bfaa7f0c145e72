"""The OpenAI-compatible routes, against a live server on 127.0.0.1."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from deltastore.sources import open_model
from server.engine.core import digest
from server.schemas import ChatCompletionRequest, CompletionRequest
from tests.server.conftest import MAX_TOKENS, PROMPTS


def complete(live, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    r = live.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_ready_models(live):
    assert live.client.get("/health").json() == {"status": "ok"}
    ready = live.client.get("/ready").json()
    assert ready["status"] == "ready" and ready["variants"] == 5
    data = live.client.get("/v1/models").json()["data"]
    base = live.state.base_name
    assert data[0]["id"] == base and data[0]["parent"] is None
    assert {m["id"] for m in data[1:]} == {f"v{i}" for i in range(5)}
    assert all(m["parent"] == base and m["object"] == "model" for m in data[1:])


def test_every_variant_matches_its_materialized_finetune(live, references):
    outputs = {}
    for variant, texts in references.items():
        model = variant or live.state.base_name
        for prompt in PROMPTS:
            got = complete(live, model, prompt)
            outputs[variant, prompt] = got["choices"][0]["text"]
            assert got["choices"][0]["text"] == texts[prompt], (variant, prompt)
            assert got["usage"]["completion_tokens"] <= MAX_TOKENS
            assert (
                got["usage"]["total_tokens"]
                == got["usage"]["prompt_tokens"] + got["usage"]["completion_tokens"]
            )
    # the variants really differ from the base, or this test would prove nothing
    assert sum(outputs[v, p] != outputs[None, p] for v in references if v for p in PROMPTS) >= 10


def _base_is_pristine(live, base_dir) -> None:
    engine = live.state.engine
    live.state.scheduler.control(lambda e: e.activate(None)).result(timeout=30)
    src = open_model(base_dir)
    for name, p in engine.params.items():
        assert torch.equal(p.detach(), src.get(name)), name


def test_interleaved_concurrent_requests(live, references, tiny_dirs):
    # v0 pinned in the one-variant materialized budget: everything else swaps in place
    assert live.admin.post("/admin/deltas/v0/pin").status_code == 200
    assert live.admin.post("/admin/deltas/v0/preload").json()["tier"] == "materialized"
    jobs = [(v, p) for _ in range(2) for v in references for p in PROMPTS]
    jobs = jobs[::2] + jobs[1::2]  # interleave variants

    def one(job):
        v, p = job
        return job, complete(live, v or live.state.base_name, p)["choices"][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, jobs))
    for (v, p), text in results:
        assert text == references[v][p], (v, p)
    metrics = live.client.get("/metrics").text
    steps = _sample(metrics, "deltaserve_step_variants_count")  # steps of several variants
    at_most_one = _sample(metrics, 'deltaserve_step_variants_bucket{le="1.0"}')
    assert steps - at_most_one > 0, "no step mixed variants"
    _base_is_pristine(live, tiny_dirs["base"])


def _sample(metrics: str, name: str) -> float:
    """The value of one Prometheus sample (`name` with its labels, if any)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _sse(text):
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in text.split("\n\n") if line.strip())
    return events


def test_streaming_joins_to_the_non_streamed_text(live):
    for model in ("v1", live.state.base_name):
        plain = complete(live, model, "the cat")["choices"][0]["text"]
        r = live.client.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": "the cat",
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_chat_and_chat_streaming(live):
    body = {
        "model": "v2",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    r = live.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and r.json()["object"] == "chat.completion"
    events = _sse(live.client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]


def test_openai_client_library_works_unchanged(live):
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert "v0" in ids
    c = client.completions.create(model="v0", prompt="the cat", max_tokens=5, temperature=0)
    assert c.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model="v0", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    streamed = "".join(
        (chunk.choices[0].delta.content or "")
        for chunk in client.chat.completions.create(
            model="v0",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
    )
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")


def test_sampling_is_seeded_and_stop_strings_cut(live):
    body = {"model": "v3", "prompt": "the", "max_tokens": 16, "temperature": 1.0, "seed": 7}
    a = live.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = live.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b
    full = complete(live, "v3", "the cat", max_tokens=16)["choices"][0]["text"]
    if len(full) > 3:
        stop = full[2:4]
        cut = complete(live, "v3", "the cat", max_tokens=16, stop=[stop])["choices"][0]
        assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "../etc", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "v0", "prompt": "x", "best_of": 2}, 400, "unsupported_option"),
        ({"model": "v0", "prompt": "x", "logit_bias": {"1": 5}}, 400, "unsupported_option"),
        ({"model": "v0", "prompt": "x", "n": 0}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "n": 1000}, 400, "invalid_request"),
        ({"model": "v0", "prompt": ["x"] * 30, "n": 3}, 400, "too_many_choices"),
        ({"model": "v0", "prompt": "x", "logprobs": 21}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "v0", "prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
        ({"model": "v0", "prompt": "x", "top_k": -2}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "repetition_penalty": 0}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "presence_penalty": 3}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
        ({"model": "v0", "prompt": "x", "stream_options": {"bogus": 1}}, 400, "invalid_request"),
        ({"model": "v0", "prompt": []}, 400, "empty_prompt"),
        ({"model": "v0", "prompt": [[1, 2], []]}, 400, "empty_prompt"),
        ({"model": "v0", "prompt": [5, -1]}, 400, "prompt"),
        ({"model": "v0", "prompt": [[5], [10**9]]}, 400, "prompt"),
        ({"model": "v0", "prompt": [1, "a"]}, 400, "invalid_request"),
        ({"model": "v0", "prompt": ["x"] * 300}, 400, "too_many_prompts"),
        # the tiny model's context is 256 positions: beyond it is a 400, never a clamp
        ({"model": "v0", "prompt": "x" * 220, "max_tokens": 60}, 400, "context_length_exceeded"),
        ({"model": "v0", "prompt": "x" * 300}, 400, "context_length_exceeded"),
        (
            {"model": "v0", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            {"model": "v0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            {
                "model": "v0",
                "messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}],
            },
            400,
            "invalid_request",
        ),
        (
            {"model": "v0", "messages": [{"role": "user", "content": "hi"}], "echo": True},
            400,
            "unsupported_option",
        ),
        ({"model": "v0", "prompt": "x", "frobnicate": 1}, 400, "unsupported_option"),
        ({"model": "v0", "prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": "v0", "prompt": "x", "temperature": 9}, 400, "invalid_request"),
        ({"model": "v0"}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x" * 3000}, 400, "context_length_exceeded"),
        # refused before tokenizing: more characters than the token limit allows
        ({"model": "v0", "prompt": "word " * 200_000}, 400, "context_length_exceeded"),
        ({"model": "v0", "prompt": "x", "seed": 2**70}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "seed": -(2**70)}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "stop": ["a"] * 17}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "stop": ["a" * 1000]}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x", "stop": "a" * 1000}, 400, "invalid_request"),
        ({"model": "v0", "prompt": "x" * (2 << 20)}, 413, "too_large"),  # the body limit
        (
            {"model": "v0", "messages": [{"role": "user", "content": "hi"}] * 300},
            400,
            "invalid_request",
        ),
    ],
)
def test_errors_are_openai_shaped(live, body, status, code):
    store = {f.name: f.read_bytes() for f in live.state.store.root.iterdir()}
    resident = digest(live.state.engine.weights)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = live.client.post(path, json=body)
    assert {f.name: f.read_bytes() for f in live.state.store.root.iterdir()} == store
    assert digest(live.state.engine.weights) == resident
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    # a field of the request (one given, or a required one missing), else null
    fields = {*body, *CompletionRequest.model_fields, *ChatCompletionRequest.model_fields}
    assert err["param"] is None or err["param"].split(".")[0] in fields, err


def test_metrics_have_bounded_labels(live):
    complete(live, "v4", "the")
    text = live.client.get("/metrics").text
    for name in (
        "deltaserve_requests_total",
        "deltaserve_time_to_first_token_seconds_bucket",
        "deltaserve_queue_seconds_bucket",
        "deltaserve_request_seconds_bucket",
        "deltaserve_generated_tokens_total",
        "deltaserve_cache_hits_total",
        "deltaserve_cache_bytes",
        "deltaserve_materialized_variants",
    ):
        assert name in text, name
    assert '"v4"' not in text


def _generated(live) -> float:
    for line in live.client.get("/metrics").text.splitlines():
        if line.startswith("deltaserve_generated_tokens_total"):
            return float(line.split()[-1])
    raise AssertionError("no generated-tokens metric")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(live, stream, monkeypatch):
    import httpx

    runner = live.state.scheduler.runner  # every step's forward
    forward = runner.forward

    def slow_forward(*args, **kwargs):  # 64 tokens now take >= 1.3 s
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", slow_forward)
    base = live.state.base_name  # greedy on "a" runs to max_tokens (no early EOS)
    long = {"model": base, "prompt": "a", "max_tokens": 64, "temperature": 0.0, "stream": stream}
    before = _generated(live)
    if stream:
        with live.client.stream("POST", "/v1/completions", json=long) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line)  # then hang up
            assert json.loads(first[len("data: ") :])["object"] == "text_completion"
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/completions", json=long, timeout=0.2)
    deadline = time.time() + 10
    while live.state.scheduler.in_flight(base) and time.time() < deadline:
        time.sleep(0.01)
    assert live.state.scheduler.in_flight(base) == 0
    time.sleep(0.2)  # let the finished request reach the metrics
    assert _generated(live) - before < 40  # stopped early, not run to max_tokens
