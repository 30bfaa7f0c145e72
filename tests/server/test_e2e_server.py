"""End to end on the real embedded base: upload a delta, serve it and the base."""

from __future__ import annotations

import json

import pytest
import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta, save_delta
from deltastore.methods import Method, select, tensor_generator
from deltastore.sources import fingerprint, open_model
from tests.server.conftest import LiveServer, make_settings

pytestmark = pytest.mark.e2e


def _variant(embedded_base, path):
    """A DARE p=0.99 delta over every matrix of the real base (SFT-scale noise)."""
    src = open_model(embedded_base)
    tensors = {}
    for name in src.names():
        shape = src.shape(name)
        if len(shape) < 2:
            continue
        d = torch.randn(shape, generator=torch.Generator().manual_seed(len(tensors))) * 3e-4
        pos = select(Method.DARE, d, 0.99, tensor_generator(0, name))
        tensors[name] = TensorDelta(name, shape, pos, d.reshape(-1)[pos].bfloat16(), 100.0)
    meta = DeltaMeta(base_fingerprint=fingerprint(src), method="dare", rate=0.99, q=0.01)
    save_delta(path, Delta(meta, tensors))
    return path


def test_serve_the_real_base_and_a_variant(embedded_base, tmp_path):
    delta = _variant(embedded_base, tmp_path / "noisy.delta.safetensors")
    srv = LiveServer(
        make_settings(
            embedded_base, tmp_path / "store", max_new_tokens=32, materialized_cache_bytes=0
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
        assert 'deltaserve_swap_seconds_count{mode="inplace"} 1.0' in metrics
    finally:
        srv.stop()
