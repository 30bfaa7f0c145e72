"""`deltaserve serve` itself, as a user starts it (a subprocess on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from server.config import Settings
from tests.conftest import free_port


def test_serve_help_documents_every_setting():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
        assert f"DELTASERVE_{name.upper()}" in out, name


def test_serve_starts_answers_and_stops(tiny_dirs, tmp_path):
    port = free_port()
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": "env-token-123", "DELTASERVE_PORT": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--base",
            str(tiny_dirs["base"]),
            "--store",
            str(tmp_path / "store"),
            "--port",
            str(port),
            "--no-demo",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server not ready in 60 s"
            time.sleep(0.2)
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "base", "prompt": "the", "max_tokens": 3}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # the env token reached the settings: admin answers 200 with it
        r = httpx.get(f"{url}/admin/deltas", headers={"Authorization": "Bearer env-token-123"})
        assert r.status_code == 200 and r.json() == []
        assert (tmp_path / "store").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_settings_are_a_clear_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "70000", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "port" in (res.stderr + res.stdout)


def test_a_busy_port_exits_non_zero_before_loading(tiny_dirs, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--base",
                str(tiny_dirs["base"]),
                "--store",
                str(tmp_path / "store"),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "ready:" not in res.stdout + res.stderr and "Loading" not in res.stderr


def test_the_base_serves_while_the_demos_are_made(tiny_dirs, variant_files, tmp_path, monkeypatch):
    """First run: the port and the base answer at once; the demo variants are made in
    the background and appear when they are in the store (/ready says so meanwhile)."""
    import shutil
    import threading

    import deltastore.demo
    import server.app
    from server.app import ThreadedServer

    release = threading.Event()

    def fake_install(base_dir, store, progress=True):
        release.wait(60)
        shutil.copy(variant_files["v0"], store.path("arith"))
        return ["arith"]

    monkeypatch.setattr(server.app, "ensure_embedded_base", lambda progress=True: tiny_dirs["base"])
    monkeypatch.setattr(deltastore.demo, "install_demos", fake_install)
    settings = Settings(store=tmp_path / "store", port=0, device="cpu", demo=True)
    srv = ThreadedServer(settings)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            deadline = time.time() + 30
            while client.get("/ready").json().get("demos") != "building":
                assert time.time() < deadline
                time.sleep(0.05)
            body = {"model": "base", "prompt": "the cat", "max_tokens": 3}
            assert client.post("/v1/completions", json=body).status_code == 200
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base"]
            release.set()
            while client.get("/ready").json().get("demos") != "ready":
                assert time.time() < deadline
                time.sleep(0.05)
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert ids == ["base", "arith"]
            body["model"] = "arith"
            assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        release.set()
        srv.stop()


def _gpt2_dir(path):
    """A tiny model of a type the engine does not serve (GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=260)).save_pretrained(path)
    return path


def test_a_model_type_the_engine_does_not_serve_is_refused_at_startup(tmp_path, capsys):
    from server.cli import main
    from server.engine.model_runner import SUPPORTED

    base = _gpt2_dir(tmp_path / "gpt2")
    code = main(["serve", "--base", str(base), "--store", str(tmp_path / "s"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "'gpt2' is not served" in err
    assert all(kind in err for kind in SUPPORTED)


def test_the_app_refuses_it_too_and_never_falls_back(tmp_path):
    """Started without the CLI's check (a Ray replica, an ASGI server), the base's load
    fails with the same error and /ready says loading failed: nothing serves it."""
    from server.app import ThreadedServer
    from tests.server.conftest import make_settings

    base = _gpt2_dir(tmp_path / "gpt2")
    srv = ThreadedServer(make_settings(base, tmp_path / "store"))
    try:
        try:
            srv.wait_ready(timeout=60)
            raise AssertionError("a gpt2 base became ready")
        except RuntimeError as e:
            assert "UnsupportedModel" in str(e) and "'gpt2' is not served" in str(e)
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and "failed" in r.text
    finally:
        srv.stop()
