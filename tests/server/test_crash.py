"""SIGKILL mid-upload, mid-replace, mid-delete and mid-swap, then a restart: the
store holds exactly the committed deltas, each the bytes it was committed with, no
temporary file is left, the base on disk is unchanged and every answer is exact.

One `deltaserve serve` process per crash (a real process, so the kill is real), on
127.0.0.1; each crash is armed through deltastore/faults.py at the step it names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deltastore.faults import ENV
from tests.server.conftest import MAX_TOKENS, PROMPTS, TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_S = 120
# every step merges its variant into the weights in place (a swap to crash in)
SWAPS = {"materialized_cache_bytes": "0", "merge_policy": "always"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, base: Path, store: Path, crash: Path, log: Path, **flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server.cli", "serve", "--base", str(base)]
        args += ["--store", str(store), "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--device", "cpu", "--dtype", "float32", "--no-demo"]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", v]
        env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": TOKEN, ENV: str(crash)}
        self.log = log.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=self.log)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + START_S
        while True:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the server did not become ready"
            try:
                if self.client.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def killed(self) -> bool:
        """True once the process died of SIGKILL (waits a little for it)."""
        try:
            return self.proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            self.close()

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.log.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _text(c: httpx.Client, model: str, prompt: str) -> str:
    r = c.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_crashes_lose_nothing_committed(tiny_dirs, variant_files, references, tmp_path):
    base, store, crash, log = (
        tiny_dirs["base"],
        tmp_path / "store",
        tmp_path / "crash",
        tmp_path / "log",
    )
    store.mkdir()
    for name in ("v0", "v1", "v2", "v3", "v4"):
        shutil.copy(variant_files[name], store / f"{name}.delta.safetensors")
    base_files = _tree(base)
    source = {n: n for n in ("v0", "v1", "v2", "v3", "v4")}  # name -> whose bytes it holds
    sha = {n: _sha(p) for n, p in variant_files.items()}

    def check(srv: Proc) -> None:
        listed = {
            d["name"]: d["sha256"] for d in srv.client.get("/admin/deltas", headers=AUTH).json()
        }
        assert listed == {n: sha[s] for n, s in source.items()}
        assert not [p.name for p in store.iterdir() if not p.name.endswith(".delta.safetensors")]
        assert _text(srv.client, base.name, PROMPTS[0]) == references[None][PROMPTS[0]]
        for name, src in source.items():
            assert _text(srv.client, name, PROMPTS[1]) == references[src][PROMPTS[1]], name

    def upload(name: str, src: str, replace: bool = False):
        return lambda c: c.post(
            "/admin/deltas",
            params={"name": name, "replace": str(replace).lower()},
            content=variant_files[src].read_bytes(),
            headers=AUTH,
        )

    def complete(model: str):
        return lambda c: c.post("/v1/completions", json={"model": model, "prompt": PROMPTS[2]})

    # (crash point, the action that reaches it, the store it leaves: name -> source)
    scenarios = [
        ("upload.received", upload("n1", "v1"), {}),  # the body on disk, not committed
        ("commit.synced", upload("n2", "v2"), {}),  # fsynced, not yet renamed
        ("commit.renamed", upload("n3", "v1"), {"n3": "v1"}),  # renamed: committed
        ("commit.synced", upload("v0", "v4", replace=True), {}),  # the old v0 stays
        ("commit.renamed", upload("v0", "v3", replace=True), {"v0": "v3"}),
        ("delete.unlinking", lambda c: c.delete("/admin/deltas/v1", headers=AUTH), {}),
        ("delete.unlinked", lambda c: c.delete("/admin/deltas/v2", headers=AUTH), {"v2": None}),
        ("swap.applied", complete("v3"), {}),  # a delta in the live weights
        ("materialize.applied", lambda c: c.post("/admin/deltas/v4/preload", headers=AUTH), {}),
    ]
    srv = Proc(base, store, crash, log, **SWAPS)
    try:
        for point, action, effect in scenarios:
            if point == "materialize.applied":  # needs a server that materializes
                srv.close()
                srv = Proc(base, store, crash, log)
            crash.write_text(point)
            with pytest.raises(httpx.TransportError):
                action(srv.client)
            assert srv.killed(), f"{point}: the server was not killed there"
            crash.write_text("")
            for name, src in effect.items():
                if src is None:
                    source.pop(name)
                else:
                    source[name] = src
            srv = Proc(base, store, crash, log, **SWAPS)
            check(srv)

        # killed from outside while an upload streams in: nothing of it stays
        def slow_body():
            data = variant_files["v3"].read_bytes()
            yield data[: len(data) // 2]
            time.sleep(30)
            yield data[len(data) // 2 :]

        killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {srv.proc.pid}"])
        with pytest.raises(httpx.TransportError):
            srv.client.post(
                "/admin/deltas", params={"name": "half"}, content=slow_body(), headers=AUTH
            )
        killer.wait()
        assert srv.killed()
        assert any(p.name.startswith(".upload-") for p in store.iterdir())  # it was mid-way
        srv = Proc(base, store, crash, log, **SWAPS)
        check(srv)
    finally:
        srv.close()
    assert _tree(base) == base_files  # no crash wrote to the base
