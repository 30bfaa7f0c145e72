"""Admin API: auth, validated atomic uploads, delete while in use, pin/preload/evict,
and a store that survives a restart."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib

import pytest
import torch
from safetensors.torch import save_file

from deltastore.format import (
    META_KEY,
    META_SHA_KEY,
    Delta,
    DeltaMeta,
    TensorDelta,
    encode_delta,
    payload_digest,
    read_meta,
    save_delta,
    sha256_text,
)
from server.engine.core import digest
from tests.conftest import make_model, save
from tests.server.conftest import TOKEN, LiveServer, make_settings


def _store_files(live):
    return sorted(p.name for p in live.state.store.root.iterdir())


def test_admin_is_off_without_a_token(tiny_dirs, tmp_path):
    srv = LiveServer(make_settings(tiny_dirs["base"], tmp_path / "s", admin_token=None))
    try:
        srv.wait_ready()
        r = srv.client.get("/admin/deltas")
        assert r.status_code == 403 and "DELTASERVE_ADMIN_TOKEN" in r.json()["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN])
def test_bad_credentials_are_401(live, auth):
    headers = {"Authorization": auth} if auth else {}
    r = live.client.get("/admin/deltas", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_upload_serve_replace_delete(live, variant_files):
    data = variant_files["v1"].read_bytes()
    r = live.admin.post("/admin/deltas", params={"name": "bot"}, content=data)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "bot" and info["size_bytes"] == len(data) and info["tier"] == "disk"
    assert info["method"] == "darex-q" and info["rate"] == 0.5 and info["kept_entries"] > 0
    same_as_v1 = {"model": "v1", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    want = live.client.post("/v1/completions", json=same_as_v1).json()["choices"][0]["text"]
    got = live.client.post("/v1/completions", json={**same_as_v1, "model": "bot"}).json()
    assert got["choices"][0]["text"] == want

    r = live.admin.post("/admin/deltas", params={"name": "bot"}, content=data)
    assert r.status_code == 409
    # replace: the new weights are served, not a cached copy of the old
    new = variant_files["v2"].read_bytes()
    r = live.admin.post("/admin/deltas", params={"name": "bot", "replace": "true"}, content=new)
    assert r.status_code == 201
    want2 = live.client.post("/v1/completions", json={**same_as_v1, "model": "v2"}).json()
    got2 = live.client.post("/v1/completions", json={**same_as_v1, "model": "bot"}).json()
    assert got2["choices"][0]["text"] == want2["choices"][0]["text"]

    assert live.admin.get("/admin/deltas/bot").json()["sha256"] == r.json()["sha256"]
    assert "bot" in [d["name"] for d in live.admin.get("/admin/deltas").json()]
    assert live.admin.delete("/admin/deltas/bot").json() == {"deleted": "bot"}
    assert (
        live.client.post("/v1/completions", json={**same_as_v1, "model": "bot"}).status_code == 404
    )
    assert live.admin.get("/admin/deltas/bot").status_code == 404
    assert "bot.delta.safetensors" not in _store_files(live)


def _edit_meta(data: bytes, edit) -> bytes:
    """The file with its deltaserve metadata edited, its checksum left as it was."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["deltaserve"])
    edit(meta)
    header["__metadata__"]["deltaserve"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _lying_scale(meta) -> None:
    first = sorted(meta["tensors"])[0]
    meta["tensors"][first]["scale"] *= 3  # a 1/q that is not the one the file was made with


def _bomb(tmp_path, fp: str) -> bytes:
    """Checksums right, but one value stream inflates to 64 MiB for 2 values."""
    name = "model.layers.0.self_attn.q_proj.weight"
    good = TensorDelta(name, (32, 32), torch.tensor([5, 6]), torch.ones(2), 1.0)
    blobs, metas = encode_delta(
        Delta(DeltaMeta(base_fingerprint=fp, method="dare", rate=0.5), {name: good})
    )
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)
    blobs[f"{name}::val"] = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
    meta = DeltaMeta(base_fingerprint=fp, method="dare", rate=0.5, tensors=metas)
    meta = meta.model_copy(update={"payload_sha256": payload_digest(blobs)})
    raw = meta.model_dump_json()
    path = tmp_path / "bomb.safetensors"
    save_file(blobs, str(path), metadata={META_KEY: raw, META_SHA_KEY: sha256_text(raw)})
    return path.read_bytes()


def _bad_files(tmp_path, good: bytes, other_base_delta: bytes):
    truncated = good[: len(good) // 2]
    corrupted = bytearray(good)
    corrupted[-3] ^= 0xFF
    n = struct.unpack("<Q", good[:8])[0]
    meta_flip = bytearray(good)
    key = b'\\"scale\\":'  # inside the header, the metadata is an escaped JSON string
    at = good.index(key, 8, 8 + n) + len(key)  # the first digit of a tensor's scale
    meta_flip[at] ^= 0x01
    return {
        "truncated": truncated,
        "corrupted": bytes(corrupted),
        "bit-flipped-metadata": bytes(meta_flip),
        "lying-metadata": _edit_meta(good, _lying_scale),
        "foreign": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        "garbage": b"not a delta at all" * 10,
        "other-base": other_base_delta,
    }


def _delta_bytes(tmp_path, name, **kw) -> bytes:
    meta = DeltaMeta(base_fingerprint=kw.pop("fp"), method="dare", rate=0.5)
    path = tmp_path / f"{name}.delta.safetensors"
    save_delta(path, Delta(meta, {t.name: t for t in kw.pop("tensors")}))
    return path.read_bytes()


def test_every_bad_upload_is_refused_and_nothing_is_stored(live, variant_files, tmp_path):
    good = variant_files["v0"].read_bytes()
    fp = read_meta(variant_files["v0"]).base_fingerprint
    cases = _bad_files(
        tmp_path,
        good,
        _delta_bytes(
            tmp_path,
            "ob",
            fp="sha256:other",
            tensors=[
                TensorDelta("model.norm.weight", (32,), torch.tensor([0]), torch.ones(1), 1.0)
            ],
        ),
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    cases["out-of-bounds"] = _delta_bytes(
        tmp_path,
        "oob",
        fp=fp,
        tensors=[TensorDelta(name, (32, 32), torch.tensor([5, 1024]), torch.ones(2), 1.0)],
    )
    cases["duplicate"] = _delta_bytes(
        tmp_path,
        "dup",
        fp=fp,
        tensors=[TensorDelta(name, (32, 32), torch.tensor([5, 5]), torch.ones(2), 1.0)],
    )
    cases["non-finite"] = _delta_bytes(
        tmp_path,
        "nan",
        fp=fp,
        tensors=[
            TensorDelta(
                name, (32, 32), torch.tensor([5, 6]), torch.tensor([1.0, float("nan")]), 1.0
            )
        ],
    )
    cases["unknown-tensor"] = _delta_bytes(
        tmp_path,
        "unk",
        fp=fp,
        tensors=[TensorDelta("model.extra.weight", (4,), torch.tensor([0]), torch.ones(1), 1.0)],
    )
    cases["wrong-shape"] = _delta_bytes(
        tmp_path,
        "shape",
        fp=fp,
        tensors=[TensorDelta(name, (16, 64), torch.tensor([0]), torch.ones(1), 1.0)],
    )
    cases["zlib-bomb"] = _bomb(tmp_path, fp)
    cases["empty"] = b""
    before = _store_files(live)
    before_hash = {p.name: p.read_bytes() for p in live.state.store.root.iterdir()}
    resident = digest(live.state.engine.weights)
    for case, data in cases.items():
        r = live.admin.post("/admin/deltas", params={"name": f"bad-{case}"}, content=data)
        assert r.status_code == 400, (case, r.text)
        err = r.json()["error"]
        assert err["code"] in ("invalid_delta", "empty") and err["message"], case
        assert ".upload-" not in err["message"]
        assert _store_files(live) == before, case  # nothing stored, no temp file left
    assert {p.name: p.read_bytes() for p in live.state.store.root.iterdir()} == before_hash
    assert digest(live.state.engine.weights) == resident  # the resident weights untouched


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", ".hidden", "x" * 65, "bad name", "..", "a..b", "bot\n", "bot\n\n"]
)
def test_invalid_names(live, variant_files, name):
    r = live.admin.post("/admin/deltas", params={"name": name}, content=b"x")
    assert r.status_code in (400, 404), name
    assert not any("evil" in f or "\n" in f for f in _store_files(live))
    if "\n" in name:  # the name check matches the whole name, not up to a newline
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name"


def test_upload_size_limit(tiny_dirs, variant_files, tmp_path):
    srv = LiveServer(make_settings(tiny_dirs["base"], tmp_path / "s", max_upload_bytes=1000))
    try:
        srv.wait_ready()
        r = srv.admin.post(
            "/admin/deltas", params={"name": "big"}, content=variant_files["v0"].read_bytes()
        )
        assert r.status_code == 413

        # chunked (no content-length): cut off while streaming
        def chunks():
            data = variant_files["v0"].read_bytes()
            for i in range(0, len(data), 512):
                yield data[i : i + 512]

        r = srv.admin.post("/admin/deltas", params={"name": "big"}, content=chunks())
        assert r.status_code == 413
        assert sorted(p.name for p in srv.state.store.root.iterdir()) == []
    finally:
        srv.stop()


def test_delta_for_another_base_is_refused_at_upload(live, tmp_path):
    other = save(make_model(5), tmp_path / "other-base")
    from deltastore.compress import CompressOptions, compress
    from deltastore.methods import Method
    from deltastore.sources import open_finetune, open_model
    from tests.conftest import perturbed

    base = open_model(other)
    ft = save(perturbed(base.load_model(), 0.3, 1), tmp_path / "other-ft")
    path = tmp_path / "o.delta.safetensors"
    save_delta(
        path,
        compress(
            base,
            open_finetune(base, ft),
            CompressOptions(method=Method.DARE, rate=0.5, progress=False),
        ),
    )
    r = live.admin.post("/admin/deltas", params={"name": "other"}, content=path.read_bytes())
    assert r.status_code == 400 and "base" in r.json()["error"]["message"]


def test_delete_while_in_use_lets_running_requests_finish(live):
    results = {}

    def long_request():
        r = live.client.post(
            "/v1/completions",
            json={"model": "v3", "prompt": "the cat", "max_tokens": 64, "temperature": 0},
        )
        results["status"], results["body"] = r.status_code, r.json()

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 10
    while live.state.scheduler.in_flight("v3") == 0 and time.time() < deadline:
        time.sleep(0.005)
    r = live.admin.delete("/admin/deltas/v3")
    t.join()
    assert r.status_code == 200
    assert results["status"] == 200 and results["body"]["usage"]["completion_tokens"] > 0
    assert (
        live.client.post("/v1/completions", json={"model": "v3", "prompt": "x"}).status_code == 404
    )


def test_pin_preload_evict_and_cache(live):
    assert live.admin.post("/admin/deltas/v1/preload").json()["tier"] == "materialized"
    assert live.admin.post("/admin/deltas/v1/pin").json()["pinned"] is True
    assert live.admin.post("/admin/deltas/v1/evict").status_code == 409  # pinned
    # the pinned variant survives pressure from another variant
    live.admin.post("/admin/deltas/v2/preload")
    cache = live.admin.get("/admin/cache").json()
    mat = next(t for t in cache["tiers"] if t["tier"] == "materialized")
    assert [e["name"] for e in mat["entries"]] == ["v1"] and mat["entries"][0]["pinned"]
    assert live.admin.get("/admin/deltas/v2").json()["tier"] == "device"  # applied in place
    assert live.admin.post("/admin/deltas/v1/unpin").json()["pinned"] is False
    r = live.admin.post("/admin/deltas/v1/evict")
    assert r.status_code == 200 and r.json()["tier"] == "disk"
    assert live.admin.post("/admin/deltas/nope/preload").status_code == 404


def test_store_survives_a_restart(tiny_dirs, variant_files, tmp_path):
    store = tmp_path / "store"
    srv = LiveServer(make_settings(tiny_dirs["base"], store))
    srv.wait_ready()
    body = {"model": "kept", "prompt": "the cat", "max_tokens": 6, "temperature": 0}
    try:
        assert (
            srv.admin.post(
                "/admin/deltas", params={"name": "kept"}, content=variant_files["v4"].read_bytes()
            ).status_code
            == 201
        )
        before = srv.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    finally:
        srv.stop()
    (store / ".upload-crashed.tmp").write_bytes(b"partial")  # as if a crash hit mid-upload
    srv = LiveServer(make_settings(tiny_dirs["base"], store))
    try:
        srv.wait_ready()
        assert [m["id"] for m in srv.client.get("/v1/models").json()["data"]][1:] == ["kept"]
        after = srv.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert after == before
        assert not (store / ".upload-crashed.tmp").exists()
    finally:
        srv.stop()


def test_not_ready_is_503(tmp_path):
    srv = LiveServer(make_settings(tmp_path / "no-such-base", tmp_path / "s"))
    try:
        deadline = time.time() + 10
        while srv.state.load_error is None and time.time() < deadline:
            time.sleep(0.02)
        r = srv.client.get("/ready")
        message = r.json()["error"]["message"]
        assert r.status_code == 503 and "server log" in message
        assert "no-such-base" not in message  # internal detail stays in the log
        r = srv.client.post("/v1/completions", json={"model": "x", "prompt": "y"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert srv.client.get("/health").status_code == 200
    finally:
        srv.stop()


def test_full_queue_answers_429(tiny_dirs, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    srv = LiveServer(
        make_settings(tiny_dirs["base"], tmp_path / "s", queue_limit=1, max_batch_size=1)
    )
    try:
        srv.wait_ready()
        runner = srv.state.scheduler.runner  # every step's forward
        forward = runner.forward

        def slow(*a, **k):
            time.sleep(0.01)
            return forward(*a, **k)

        runner.forward = slow
        body = {"model": srv.state.base_name, "prompt": "a", "max_tokens": 30}
        with ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(lambda _: srv.client.post("/v1/completions", json=body), range(6))
            )
        statuses = sorted(r.status_code for r in codes)
        assert 200 in statuses and 429 in statuses, statuses
        err = next(r for r in codes if r.status_code == 429).json()["error"]
        assert err["type"] == "rate_limit_error" and "queued" in err["message"]
    finally:
        srv.stop()


def test_cache_shows_each_variants_mixed_step_layout(live):
    body = {"model": "v3", "prompt": "the cat", "max_tokens": 2, "temperature": 0}
    assert live.client.post("/v1/completions", json=body).status_code == 200
    cache = live.admin.get("/admin/cache").json()
    mixed = next(t for t in cache["tiers"] if t["tier"] == "mixed")
    (entry,) = [e for e in mixed["entries"] if e["name"] == "v3"]
    layout = entry["layout"]
    assert layout["kept_entries"] > 0 and layout["matrices"] > 0
    assert layout["bytes"] == entry["nbytes"] <= mixed["used_bytes"]


def test_the_fidelity_estimate_a_file_records_is_shown(live, variant_files, tmp_path):
    """`GET /admin/deltas` and `GET /v1/models/{id}` show the estimate compress recorded;
    a file made without one (or before they were recorded) shows null."""
    from deltastore.format import load_delta

    delta = load_delta(variant_files["v1"])
    recorded = {"kept": 0.42, "variant": 0.5, "base": 0.125, "finetune": 1.0}
    recorded |= {"continuations": 32, "tokens": 0.8, "shift": 3.1}
    path = tmp_path / "est.delta.safetensors"
    save_delta(path, Delta(delta.meta.model_copy(update={"fidelity": recorded}), delta.tensors))
    r = live.admin.post("/admin/deltas", params={"name": "est"}, content=path.read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["fidelity"] == recorded
    listed = {d["name"]: d for d in live.admin.get("/admin/deltas").json()}
    assert listed["est"]["fidelity"] == recorded
    assert live.client.get("/v1/models/est").json()["delta"]["fidelity"] == recorded
    assert live.client.get("/v1/models/v1").json()["delta"]["fidelity"] is None
    assert live.admin.delete("/admin/deltas/est").status_code == 200
