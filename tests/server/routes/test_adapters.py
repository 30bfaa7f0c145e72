"""vLLM's runtime adapter API (server/routes/adapters.py), an admin upload by
reference and --lora-modules (server/adapters.py), against a live server on
127.0.0.1: vLLM's status codes and bodies, lora_path confined to --adapter-roots,
and every kind of reference served as a variant."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from deltastore.format import load_delta, read_meta
from deltastore.materialize import materialize
from deltastore.sources import open_model
from server.adapters import LORA_MODULES_SOURCE
from server.config import Settings
from tests.conftest import lay_out_hub
from tests.server.conftest import LiveServer, make_settings, reference_text

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def refs(tiny_dirs, variant_files, tmp_path_factory) -> dict[str, Path]:
    """An allowed root holding a LoRA adapter, a full fine-tune and a delta file; an
    outside directory; links out of the root; a directory with a file linked out."""
    root = tmp_path_factory.mktemp("adapters")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    base = open_model(tiny_dirs["base"])
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base.load_model(), cfg).save_pretrained(allowed / "lora")
    shutil.copytree(allowed / "lora", outside / "lora")
    shutil.copytree(tiny_dirs["ft"], allowed / "full")
    shutil.copy(variant_files["v1"], allowed / "v1.delta.safetensors")
    (allowed / "link-out").symlink_to(outside / "lora")
    (allowed / "leaky").mkdir()
    shutil.copy(allowed / "lora" / "adapter_config.json", allowed / "leaky")
    (allowed / "leaky" / "adapter_model.safetensors").symlink_to(
        outside / "lora" / "adapter_model.safetensors"
    )
    (allowed / "junk").mkdir()
    (allowed / "junk" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return {"root": root, "allowed": allowed, "outside": outside}


@pytest.fixture
def server(tiny_dirs, refs, tmp_path) -> Iterator[LiveServer]:
    srv = LiveServer(
        make_settings(tiny_dirs["base"], tmp_path / "store", adapter_roots=[refs["allowed"]])
    )
    srv.wait_ready()
    yield srv
    srv.stop()


def _vllm_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["code"] == status and err["param"] is None
    return str(err["message"])


def _greedy(server: LiveServer, model: str) -> str:
    body = {"model": model, "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
    r = server.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


@pytest.mark.parametrize("kind", ["lora", "full", "v1.delta.safetensors"])
def test_load_serve_and_unload_each_kind(server, refs, tiny_dirs, tmp_path, kind):
    path = refs["allowed"] / kind
    r = server.admin.post(LOAD, json={"lora_name": "ada", "lora_path": str(path)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'ada' added successfully."
    cards = {m["id"]: m for m in server.client.get("/v1/models").json()["data"]}
    assert cards["ada"]["parent"] == server.state.base_name
    stored = server.state.store.path("ada")
    meta = read_meta(stored)
    if kind.endswith(".safetensors"):  # a delta file is served as it is
        given = load_delta(path)
        assert all(
            load_delta(stored).tensors[n].values.equal(t.values) for n, t in given.tensors.items()
        )
    else:  # compressed with recommend's defaults: p = 0.99 here, q searched
        assert meta.source == str(path) and meta.rate >= 0.99 and meta.q_search
        assert meta.method == ("magnitude" if kind == "lora" else "darex-q")
    # the server serves exactly what it stored
    model_dir = materialize(
        open_model(tiny_dirs["base"]), load_delta(stored), tmp_path / "m", False
    )
    assert _greedy(server, "ada") == reference_text(model_dir, "the cat sat")
    r = server.admin.post(UNLOAD, json={"lora_name": "ada"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'ada' removed successfully."
    assert not stored.exists()
    assert "ada" not in [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    message = _vllm_error(
        server.admin.post(UNLOAD, json={"lora_name": "ada"}), 404, "NotFoundError"
    )
    assert message == "The lora adapter 'ada' cannot be found."


def test_vllms_errors(server, refs):
    lora = str(refs["allowed"] / "lora")
    for body in ({}, {"lora_name": "x"}, {"lora_path": lora}, {"lora_name": "", "lora_path": lora}):
        message = _vllm_error(server.admin.post(LOAD, json=body), 400, "InvalidUserInput")
        assert message == "Both 'lora_name' and 'lora_path' must be provided."
    assert server.admin.post(LOAD, json={"lora_name": "a", "lora_path": lora}).status_code == 200
    first = server.state.store.info("a").sha256
    message = _vllm_error(
        server.admin.post(LOAD, json={"lora_name": "a", "lora_path": lora}), 400, "InvalidUserInput"
    )
    assert message == (
        "The lora adapter 'a' has already been loaded. If you want to load the adapter in "
        "place, set 'load_inplace' to True."
    )
    full = str(refs["allowed"] / "full")
    r = server.admin.post(LOAD, json={"lora_name": "a", "lora_path": full, "load_inplace": True})
    assert r.status_code == 200 and server.state.store.info("a").sha256 != first
    missing = str(refs["allowed"] / "nothing-here")
    message = _vllm_error(
        server.admin.post(LOAD, json={"lora_name": "b", "lora_path": missing}), 404, "NotFoundError"
    )
    assert "No adapter found" in message
    junk = str(refs["allowed"] / "junk")
    _vllm_error(
        server.admin.post(LOAD, json={"lora_name": "b", "lora_path": junk}), 400, "BadRequestError"
    )
    _vllm_error(
        server.admin.post(LOAD, json={"lora_name": "../b", "lora_path": lora}),
        400,
        "InvalidUserInput",
    )
    message = _vllm_error(server.admin.post(UNLOAD, json={}), 400, "InvalidUserInput")
    assert message == "'lora_name' needs to be provided to unload a LoRA adapter."
    assert server.state.store.names() == ["a"]  # nothing else was stored
    assert not [p for p in server.state.store.root.iterdir() if p.name.startswith(".upload")]


def test_lora_path_is_confined_and_a_refusal_reveals_nothing(server, refs):
    allowed, outside = refs["allowed"], refs["outside"]
    refused = [
        str(outside / "lora"),  # outside
        str(outside / "no-such-thing"),  # outside, absent: the same answer
        "/etc",
        str(allowed / "link-out"),  # a link out of the root
        str(allowed / ".." / "outside" / "lora"),  # ..
        str(allowed / "lora" / ".." / "lora"),  # .. even when it stays inside
        str(allowed / "leaky"),  # a file inside linked out
        os.path.relpath(outside / "lora"),  # relative
        str(allowed / "lora") + "\x00",  # no path at all: the same answer
        str(allowed / ("x" * 5000)),
        "~no-such-user/lora",
    ]
    bodies = set()
    for path in refused:
        r = server.admin.post(LOAD, json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, (path, r.text)
        bodies.add(r.content)
        assert "outside" not in r.text and "etc" not in r.text and "exist" not in r.text
        r = server.admin.post("/admin/deltas", params={"name": "x", "source": path})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert len(bodies) == 1  # every refusal is the same bytes
    assert server.state.store.names() == []


def test_auth_and_off(tiny_dirs, refs, tmp_path):
    lora = str(refs["allowed"] / "lora")
    srv = LiveServer(make_settings(tiny_dirs["base"], tmp_path / "s1"))  # no --adapter-roots
    try:
        srv.wait_ready()
        r = srv.client.post(LOAD, json={"lora_name": "a", "lora_path": lora})  # no token
        assert r.status_code == 401
        r = srv.admin.post(LOAD, json={"lora_name": "a", "lora_path": lora})
        assert r.status_code == 403 and "--adapter-roots" in r.text
        assert srv.client.post(UNLOAD, json={"lora_name": "a"}).status_code == 401
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="not a directory"):
        Settings(adapter_roots=[tmp_path / "missing"])


def test_upload_by_reference_and_by_hub_id(tiny_dirs, refs, offline_hub, tmp_path):
    lay_out_hub(offline_hub, "org/tiny-lora", refs["allowed"] / "lora")
    roots = [refs["allowed"], offline_hub]
    srv = LiveServer(make_settings(tiny_dirs["base"], tmp_path / "store", adapter_roots=roots))
    try:
        srv.wait_ready()
        r = srv.admin.post(
            "/admin/deltas", params={"name": "p", "source": str(refs["allowed"] / "full")}
        )
        assert r.status_code == 201 and r.json()["name"] == "p" and r.json()["method"] == "darex-q"
        r = srv.admin.post(
            "/admin/deltas",
            params={"name": "q", "source": str(refs["allowed"] / "lora")},
            content=b"x",
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "source"
        r = srv.admin.post(LOAD, json={"lora_name": "hub", "lora_path": "org/tiny-lora"})
        assert r.status_code == 200, r.text
        assert read_meta(srv.state.store.path("hub")).source == "org/tiny-lora"
        _greedy(srv, "hub")
        r = srv.admin.post(
            "/admin/deltas", params={"name": "h2", "source": "org/tiny-lora", "revision": "nope"}
        )
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    finally:
        srv.stop()
    # the Hub cache not among the roots: a Hub id is refused like any path outside
    srv = LiveServer(
        make_settings(tiny_dirs["base"], tmp_path / "s2", adapter_roots=[refs["allowed"]])
    )
    try:
        srv.wait_ready()
        r = srv.admin.post(LOAD, json={"lora_name": "hub", "lora_path": "org/tiny-lora"})
        assert r.status_code == 403
    finally:
        srv.stop()


def _wait_modules(srv: LiveServer) -> None:
    deadline = time.time() + 120
    while srv.client.get("/ready").json().get("lora_modules") != "ready":
        assert "failed" not in str(srv.client.get("/ready").json()), srv.client.get("/ready").text
        assert time.time() < deadline
        time.sleep(0.1)


def test_lora_modules_at_start_compressed_once(tiny_dirs, refs, variant_files, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(variant_files["v0"], store / "mine.delta.safetensors")  # an upload of its own
    modules = [
        f"lm={refs['allowed'] / 'lora'}",
        '{"name": "full", "path": "%s"}' % (refs["allowed"] / "full"),
        f"mine={refs['allowed'] / 'lora'}",
    ]
    settings = make_settings(tiny_dirs["base"], store, lora_modules=modules)
    srv = LiveServer(settings)
    try:
        srv.wait_ready()
        _wait_modules(srv)
        names = [m["id"] for m in srv.client.get("/v1/models").json()["data"]]
        assert {"lm", "full", "mine"} <= set(names)
        assert read_meta(srv.state.store.path("lm")).source.startswith(LORA_MODULES_SOURCE)
        # a variant of that name from elsewhere is kept as it was
        assert (store / "mine.delta.safetensors").read_bytes() == variant_files["v0"].read_bytes()
        _greedy(srv, "lm")
        stamps = {n: srv.state.store.stamp(n) for n in ("lm", "full")}
    finally:
        srv.stop()
    srv = LiveServer(settings)  # a restart: nothing compressed again
    try:
        srv.wait_ready()
        _wait_modules(srv)
        assert {n: srv.state.store.stamp(n) for n in ("lm", "full")} == stamps
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="NAME=PATH"):
        Settings(lora_modules=["no-equals-sign"])
    with pytest.raises(ValueError, match="given twice"):
        Settings(lora_modules=["a=/x", "a=/y"])
    assert Settings(lora_modules="a=/x, b=/y").lora_module_refs() == [("a", "/x"), ("b", "/y")]
