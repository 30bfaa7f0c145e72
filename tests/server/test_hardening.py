"""Faults injected where the weights change, one bad request among good ones,
linearizable admin actions, secrets and what error bodies may say."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import server.engine.core as engine_mod
from deltastore.apply import FlatWeights, apply_delta_, bind
from deltastore.format import load_delta
from server.config import Settings
from server.engine.core import Engine, Mode, WeightsUnavailable, digest
from tests.server.conftest import TOKEN, LiveServer, make_settings
from tests.server.engine.test_core import _engine

PROMPT = "the cat sat"


def _bound_to_base(e: Engine) -> bool:
    return all(p.data_ptr() == e._ptrs[n] for n, p in e.params.items())


# --------------------------------------------------------------------------- transactional


def test_apply_that_fails_midway_rolls_back_every_group(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    """A delta whose last chunk has a bad index: the chunks before it were written,
    and must be put back before the error propagates."""
    import deltastore.apply as apply_mod
    from deltastore.apply import BoundDelta, BoundGroup

    monkeypatch.setattr(apply_mod, "CPU_CHUNK", 1000)  # chunks the tiny model can hold
    e = _engine(tiny_dirs, variant_files, tmp_path)
    before = digest(e.weights)
    n = 2 * 1000 + 5  # two whole chunks written before the failing one
    assert e.weights.buffers[0].numel() > n
    index = torch.cat([torch.arange(n), torch.tensor([e.weights.buffers[0].numel() + 7])])
    bad = BoundDelta((BoundGroup(0, index, torch.ones(n + 1)),))
    with pytest.raises((IndexError, RuntimeError)):
        apply_delta_(e.weights, bad)
    assert digest(e.weights) == before and e.weights.applied_depth == 0


def test_apply_rolls_back_across_buffers():
    """Two buffers (fp32 and bf16): the second fails after the first was written."""
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(torch.randn(64).bfloat16())
    w = FlatWeights([("a", a), ("b", b)])
    before = [buf.clone() for buf in w.buffers]
    from deltastore.apply import BoundDelta, BoundGroup

    good = BoundGroup(0, torch.arange(0, 64, 2), torch.ones(32))
    bad = BoundGroup(1, torch.tensor([1, 2, 10_000]), torch.ones(3))
    with pytest.raises((IndexError, RuntimeError)):
        apply_delta_(w, BoundDelta((good, bad)))
    assert all(torch.equal(x, y) for x, y in zip(w.buffers, before, strict=True))


def test_allocation_failure_while_materializing_leaves_the_base(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    e = _engine(tiny_dirs, variant_files, tmp_path, materialize_after=1)
    e.activate("v1")
    e.activate(None)

    def oom(*a, **k):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(engine_mod.torch, "empty_like", oom)
    with pytest.raises(RuntimeError, match="injected"):
        e.activate("v0", force=True)
    monkeypatch.undo()
    assert e.mode is Mode.BASE and e.active is None and _bound_to_base(e)
    assert digest(e.weights) == e.base_digest
    assert e.activate("v0").switched  # and it still serves afterwards
    e.check()


def test_failure_after_the_weights_were_written_restores_them_from_disk(
    tiny_dirs, variant_files, tmp_path, monkeypatch
):
    """A write that left the delta in place with no undo log (the old clone-failure
    hole): the digest check finds it and the base is reloaded, bit-exact."""
    e = _engine(tiny_dirs, variant_files, tmp_path, materialized_cache_bytes=0)
    real = engine_mod.apply_delta_

    def apply_then_fail(weights, bound):
        real(weights, bound)
        raise RuntimeError("failed after writing (injected)")

    monkeypatch.setattr(engine_mod, "apply_delta_", apply_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        e.activate("v2")
    monkeypatch.undo()
    assert e.mode is Mode.BASE and e.weights.applied_depth == 0
    assert digest(e.weights) == e.base_digest


def test_invariant_check_repairs_weights_changed_behind_the_engine(
    tiny_dirs, variant_files, tmp_path
):
    e = _engine(tiny_dirs, variant_files, tmp_path)
    e.activate("v3")
    e.check()  # consistent: nothing to do
    apply_delta_(e.weights, bind(load_delta(variant_files["v1"]), e.weights))  # not via e
    e.check()
    assert e.mode is Mode.BASE and digest(e.weights) == e.base_digest
    e.activate("v4")
    e.params["model.norm.weight"].data = torch.zeros_like(e.params["model.norm.weight"])
    e.check()  # a parameter bound to a stray tensor
    assert _bound_to_base(e) and digest(e.weights) == e.base_digest


def test_a_base_that_cannot_be_restored_refuses_to_serve(tiny_dirs, variant_files, tmp_path):
    settings = make_settings(tiny_dirs["base"], tmp_path / "store")
    shutil.copytree(variant_files["v0"].parent, tmp_path / "store", dirs_exist_ok=True)
    srv = LiveServer(settings)
    try:
        srv.wait_ready()
        e = srv.state.engine
        ok = srv.client.post("/v1/completions", json={"model": "v0", "prompt": PROMPT})
        assert ok.status_code == 200

        def broken_source(*a, **k):
            raise OSError("disk gone (injected)")

        def corrupt(engine: Engine) -> None:
            engine.source.load_model = broken_source  # the reload will fail
            engine.weights.buffers[0][:8] += 1.0  # and the resident bytes are wrong

        e.params["model.norm.weight"].data = torch.zeros(1)  # the step check sees this
        srv.state.scheduler.control(corrupt).result(timeout=30)
        r = srv.client.post("/v1/completions", json={"model": "v0", "prompt": PROMPT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "weights_unavailable"
        assert "injected" not in r.text
        assert srv.client.get("/ready").status_code == 503
        r = srv.client.post("/v1/completions", json={"model": "v1", "prompt": PROMPT})
        assert r.status_code == 503  # every later request too: no wrong weights served
        with pytest.raises(WeightsUnavailable):
            e.activate("v2")
    finally:
        srv.stop()


# --------------------------------------------------------------------------- isolation


def test_one_failing_request_never_fails_its_neighbours(
    tiny_dirs, variant_files, references, tmp_path, monkeypatch
):
    """The sampling of one request raises (injected on its seed): that request alone
    gets an error with a request id; the requests batched with it are exact."""
    from server.engine.sampling import ChoiceSampling

    real = ChoiceSampling.draw

    def draw(self, generated):
        if self.seed == 666:
            raise RuntimeError("sampler exploded (injected)")
        return real(self, generated)

    monkeypatch.setattr(ChoiceSampling, "draw", draw)
    store = tmp_path / "store"
    shutil.copytree(variant_files["v0"].parent, store)
    srv = LiveServer(make_settings(tiny_dirs["base"], store, max_batch_size=8))
    srv.wait_ready()
    try:
        bodies = [{"model": "v0", "prompt": PROMPT, "temperature": 0, "max_tokens": 12}] * 5
        bad = {"model": "v0", "prompt": PROMPT, "temperature": 0.7, "seed": 666}
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(srv.client.post, "/v1/completions", json=b) for b in bodies]
            bad_r = pool.submit(srv.client.post, "/v1/completions", json=bad).result()
            good = [f.result() for f in futs]
        assert bad_r.status_code == 500, bad_r.text
        err = bad_r.json()["error"]
        assert "injected" not in err["message"] and "RuntimeError" not in err["message"]
        assert bad_r.headers["x-request-id"] in err["message"]
        for r in good:
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == references["v0"][PROMPT]
    finally:
        srv.stop()


def test_a_step_that_fails_is_retried_row_by_row(
    tiny_dirs, variant_files, references, tmp_path, monkeypatch
):
    """A forward that fails whenever one poisoned request is in it ends
    that request alone; the others, run one per step until cleared, are exact."""
    store = tmp_path / "store"
    shutil.copytree(variant_files["v0"].parent, store)
    srv = LiveServer(make_settings(tiny_dirs["base"], store, max_batch_size=8))
    srv.wait_ready()
    runner = srv.state.scheduler.runner
    real = runner.forward
    poison = srv.state.tokenizer("zebra")["input_ids"][0]

    def forward(step):
        if bool((step.ids == poison).any()):
            raise RuntimeError("kernel fault (injected)")
        return real(step)

    monkeypatch.setattr(runner, "forward", forward)
    try:
        prompts = ["the cat sat", "on a mat and", "ran", "a"]
        good_bodies = [
            {"model": f"v{i}", "prompt": p, "temperature": 0, "max_tokens": 12}
            for i, p in enumerate(prompts)
        ]
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(srv.client.post, "/v1/completions", json=b) for b in good_bodies]
            bad = pool.submit(
                srv.client.post, "/v1/completions", json={"model": "v1", "prompt": "zebra"}
            ).result()
            good = [f.result() for f in futs]
        assert bad.status_code == 500 and "injected" not in bad.text
        for body, r in zip(good_bodies, good, strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == references[body["model"]][body["prompt"]]
        assert srv.state.scheduler.kv.used == 0
    finally:
        srv.stop()


def test_unhandled_errors_answer_a_request_id_not_the_exception(live, monkeypatch):
    def boom():
        raise RuntimeError("/secret/path/in/exception")

    monkeypatch.setattr(live.state.store, "names", boom)
    r = live.client.get("/v1/models", headers={"X-Request-Id": "my-req-42"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "my-req-42"
    err = r.json()["error"]
    assert err["type"] == "server_error" and "my-req-42" in err["message"]
    assert "secret" not in r.text
    r = live.client.get("/health", headers={"X-Request-Id": "bad id\twith tab"})
    assert r.headers["x-request-id"] != "bad id\twith tab"  # not echoed: a fresh one


def test_chunked_body_over_the_limit_is_413(live):
    def body():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, no content-length

    r = live.client.post(
        "/v1/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_tokenizing_beside_generation_is_safe_and_logprob_bytes_add_up(live):
    """The HTTP side encodes with the server's one tokenizer while the worker decodes
    with it: /tokenize calls during generations all succeed and agree with a
    tokenization before them, and each generation's logprob bytes (labelled on the
    worker, a multi-byte character split over byte-level tokens included) add up to
    its text."""
    prompt = "the cat sat on the mat, é and ü " * 40
    want = live.client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    body = {
        "model": "v1",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 24,
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 1.0,
    }

    special = set(live.state.tokenizer.all_special_tokens)  # scored, never in the text

    def chat(seed: int) -> tuple[str, bytes]:
        r = live.client.post("/v1/chat/completions", json={**body, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        content = choice["logprobs"]["content"]
        raw = b"".join(bytes(e["bytes"]) for e in content if e["token"] not in special)
        return choice["message"]["content"], raw

    def tokenize(_: int) -> list[int]:
        r = live.client.post("/tokenize", json={"prompt": prompt})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    with ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(chat, seed) for seed in range(4)]
        tokens = list(pool.map(tokenize, range(24)))
    assert all(t == want for t in tokens)
    for f in chats:
        text, raw = f.result()
        assert raw.decode(errors="replace") == text


# --------------------------------------------------------------------------- the store


def test_an_upload_racing_a_delete_is_not_lost(live, variant_files, monkeypatch):
    """DELETE forgets, then unlinks; an upload of the same name that arrives in
    between waits for the delete and is then stored (it used to be deleted after
    its 201)."""
    store = live.state.store
    real_delete = store.delete

    def slow_delete(name):
        time.sleep(0.5)  # the window between forget and unlink
        real_delete(name)

    monkeypatch.setattr(store, "delete", slow_delete)
    data = variant_files["v3"].read_bytes()
    results: dict[str, int] = {}
    t = threading.Thread(
        target=lambda: results.setdefault(
            "delete", live.admin.delete("/admin/deltas/v0").status_code
        )
    )
    t.start()
    time.sleep(0.15)
    up = live.admin.post("/admin/deltas", params={"name": "v0"}, content=data)
    t.join()
    assert results["delete"] == 200 and up.status_code == 201, up.text
    assert store.exists("v0")
    r = live.client.post(
        "/v1/completions", json={"model": "v0", "prompt": PROMPT, "temperature": 0}
    )
    want = live.client.post(
        "/v1/completions", json={"model": "v3", "prompt": PROMPT, "temperature": 0}
    )
    assert (
        r.status_code == 200 and r.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
    )


def test_a_file_replaced_on_disk_is_reloaded(live, variant_files):
    """The host tier revalidates: a file swapped behind the server's back is served
    as the new file once no request holds the old one."""
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 12}
    v4 = live.client.post("/v1/completions", json={**body, "model": "v4"}).json()
    first = live.client.post("/v1/completions", json={**body, "model": "v2"}).json()
    assert first["choices"][0]["text"] != v4["choices"][0]["text"]
    tmp = live.state.store.root / "swap.tmp"
    shutil.copy(variant_files["v4"], tmp)
    os.replace(tmp, live.state.store.path("v2"))
    again = live.client.post("/v1/completions", json={**body, "model": "v2"}).json()
    assert again["choices"][0]["text"] == v4["choices"][0]["text"]


def test_a_merged_variant_whose_file_changed_is_reloaded(tiny_dirs, variant_files, tmp_path):
    """Engine v2 with every step merged: the variant stays merged between requests,
    and must still be reloaded when its file changes."""
    store = tmp_path / "store"
    shutil.copytree(variant_files["v0"].parent, store)
    srv = LiveServer(make_settings(tiny_dirs["base"], store, merge_policy="always"))
    srv.wait_ready()
    try:
        body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 12}
        v4 = srv.client.post("/v1/completions", json={**body, "model": "v4"}).json()
        srv.client.post("/v1/completions", json={**body, "model": "v2"})
        assert srv.state.engine.active == "v2"  # merged, and left merged while idle
        tmp = store / "swap.tmp"
        shutil.copy(variant_files["v4"], tmp)
        os.replace(tmp, srv.state.store.path("v2"))
        for _ in range(2):
            again = srv.client.post("/v1/completions", json={**body, "model": "v2"}).json()
            assert again["choices"][0]["text"] == v4["choices"][0]["text"]
    finally:
        srv.stop()


def test_evicting_a_variant_in_use_is_409_not_500(live):
    e, sched = live.state.engine, live.state.scheduler
    sched.control(lambda eng: eng.acquire_layout("v1")).result(timeout=30)  # as a request
    try:
        r = live.admin.post("/admin/deltas/v1/evict")
        assert r.status_code == 409 and r.json()["error"]["code"] == "in_use"
    finally:
        sched.control(lambda eng: eng.release_layout("v1")).result(timeout=30)
    assert live.admin.post("/admin/deltas/v1/evict").status_code == 200
    assert e.tier_of("v1") == "disk"


# --------------------------------------------------------------------------- secrets


def test_admin_token_from_a_file_and_api_keys(tiny_dirs, tmp_path, monkeypatch):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    keys = tmp_path / "keys"
    keys.write_text("key-one-12345\nkey-two-67890\n")
    settings = make_settings(
        tiny_dirs["base"],
        tmp_path / "store",
        admin_token=None,
        admin_token_file=token_file,
        api_keys_file=keys,
    )
    assert settings.admin_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and "key-one" not in repr(settings)
    srv = LiveServer(settings)
    try:
        srv.wait_ready()
        assert srv.client.get("/health").status_code == 200  # liveness stays open
        for path in ("/v1/models", "/metrics"):
            r = srv.client.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            bad = srv.client.get(path, headers={"Authorization": "Bearer key-one-1234X"})
            assert bad.status_code == 401
            for key in ("key-one-12345", "key-two-67890", TOKEN):
                ok = srv.client.get(path, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, (path, key)
        r = srv.client.post("/v1/completions", json={"model": "x", "prompt": "a"})
        assert r.status_code == 401
        assert srv.admin.get("/admin/deltas").status_code == 200  # the token from the file
    finally:
        srv.stop()


def test_secrets_are_never_taken_from_argv(capsys):
    from server.cli import main

    for flag in ("--admin-token", "--api-keys"):
        with pytest.raises(SystemExit):
            main(["serve", flag, "s3cret-value"])
        err = capsys.readouterr().err
        assert "DELTASERVE_" in err and "-file" in err


def test_secret_files_are_checked(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Settings(admin_token_file=empty, demo=False)
    with pytest.raises(ValueError, match="cannot read"):
        Settings(admin_token_file=tmp_path / "missing", demo=False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 8"):
        Settings(api_keys_file=short, demo=False)


def test_requests_waiting_for_a_replace_are_bounded(live):
    """While a variant is replaced its new requests wait at the door; they count
    against the queue limit, and a request for another variant does not wait."""
    state = live.state
    state.replacing.add("v0")
    state.at_door = state.settings.queue_limit
    try:
        r = live.client.post("/v1/completions", json={"model": "v0", "prompt": PROMPT})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"  # the OpenAI SDK waits that long, then retries
        other = live.client.post("/v1/completions", json={"model": "v1", "prompt": PROMPT})
        assert other.status_code == 200
    finally:
        state.replacing.discard("v0")
        state.at_door = 0
    assert (
        live.client.post("/v1/completions", json={"model": "v0", "prompt": PROMPT}).status_code
        == 200
    )


def test_a_file_that_appears_before_commit_is_409(live, variant_files, monkeypatch):
    """A store file put there by hand between the upload's check and its commit."""

    def appeared(name, upload, replace):
        raise FileExistsError(f"variant {name!r} exists (use replace=true)")

    monkeypatch.setattr(live.state.store, "commit", appeared)
    data = variant_files["v3"].read_bytes()
    r = live.admin.post("/admin/deltas", params={"name": "fresh"}, content=data)
    assert r.status_code == 409 and r.json()["error"]["code"] == "exists"
