"""End to end on the real embedded base: upload a delta, serve it and the base."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta, save_delta
from deltastore.methods import Method, select, tensor_generator
from deltastore.sources import fingerprint, open_model
from tests.server.conftest import LiveServer, make_settings, reference_text

pytestmark = pytest.mark.e2e


def _variant(embedded_base, path, seed=0):
    """A DARE p=0.99 delta over every matrix of the real base (SFT-scale noise)."""
    src = open_model(embedded_base)
    tensors = {}
    for name in src.names():
        shape = src.shape(name)
        if len(shape) < 2:
            continue
        g = torch.Generator().manual_seed(seed * 1000 + len(tensors))
        d = torch.randn(shape, generator=g) * 3e-4
        pos = select(Method.DARE, d, 0.99, tensor_generator(seed, name))
        tensors[name] = TensorDelta(name, shape, pos, d.reshape(-1)[pos].bfloat16(), 100.0)
    meta = DeltaMeta(base_fingerprint=fingerprint(src), method="dare", rate=0.99, q=0.01)
    save_delta(path, Delta(meta, tensors))
    return path


def test_serve_the_real_base_and_a_variant(embedded_base, tmp_path):
    delta = _variant(embedded_base, tmp_path / "noisy.delta.safetensors")
    srv = LiveServer(
        make_settings(
            embedded_base,
            tmp_path / "store",
            max_new_tokens=32,
            materialized_cache_bytes=0,
        )
    )
    try:
        srv.wait_ready(timeout=120)
        r = srv.admin.post("/admin/deltas", params={"name": "noisy"}, content=delta.read_bytes())
        assert r.status_code == 201, r.text
        base = srv.state.base_name
        chat = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        answer = srv.client.post("/v1/chat/completions", json={"model": base, **chat}).json()
        assert "Paris" in answer["choices"][0]["message"]["content"]
        variant = srv.client.post("/v1/chat/completions", json={"model": "noisy", **chat})
        assert variant.status_code == 200 and variant.json()["usage"]["completion_tokens"] > 0
        stream = srv.client.post(
            "/v1/chat/completions", json={"model": base, **chat, "stream": True}
        ).text
        parts = [json.loads(x[6:]) for x in stream.split("\n\n") if x.startswith("data: {")]
        text = "".join(p["choices"][0]["delta"].get("content", "") for p in parts)
        assert text == answer["choices"][0]["message"]["content"]
        metrics = srv.client.get("/metrics").text
        # the variant's rows ran beside the resident base
        assert "deltaserve_step_variants_count" in metrics
        assert 'deltaserve_steps_total{mode="unmerged"}' in metrics
    finally:
        srv.stop()


@pytest.mark.parametrize("merge_policy", ["never", "always"])
def test_mixed_steps_on_the_real_base_match_materialized_finetunes(
    embedded_base, tmp_path, merge_policy
):
    """Engine v2, fp32: the base and two variants in the same steps; each row's greedy
    tokens equal plain transformers on that fine-tune materialized; the base is bit-exact
    afterwards."""
    from deltastore.format import load_delta
    from deltastore.materialize import materialize
    from deltastore.store import DeltaStore
    from server.engine.core import Engine
    from server.engine.job import Job, SamplingParams
    from server.engine.llm_engine import LLMEngine
    from server.metrics import Metrics

    store = tmp_path / "store"
    store.mkdir()
    src = open_model(embedded_base)
    tok = src.load_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    refs = {None: {p: reference_text(embedded_base, p, 16) for p in prompts}}
    for i, name in enumerate(["a", "b"]):
        path = _variant(embedded_base, store / f"{name}.delta.safetensors", seed=i + 1)
        mat = materialize(src, load_delta(path), tmp_path / name, progress=False)
        refs[name] = {p: reference_text(mat, p, 16) for p in prompts}
    settings = make_settings(
        embedded_base,
        store,
        merge_policy=merge_policy,
        max_batch_size=8,
        max_new_tokens=16,
    )
    engine = Engine(src, DeltaStore(store), settings)
    sched = LLMEngine(engine, settings, Metrics())
    jobs = {}
    for variant in refs:
        for p in prompts:
            ids = tok(p)["input_ids"]
            job = Job(
                variant,
                ids,
                SamplingParams(max_tokens=16, temperature=0.0),
                lambda kind, payload: None,
            )
            jobs[variant, p] = job
            sched.submit(job)
    while any(j.finish_reason is None for j in jobs.values()):
        sched.step()  # on this thread: the one that loaded the model
    for (variant, p), job in jobs.items():
        assert job.text == refs[variant][p], (variant, p, job.text, refs[variant][p])
    engine.activate(None)
    for n, param in engine.params.items():
        assert torch.equal(param.detach(), src.get(n)), n
