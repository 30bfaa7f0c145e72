"""Live-server fixtures: five real variants of a tiny model, their reference outputs
from transformers, and uvicorn on 127.0.0.1 in a thread."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deltastore.compress import CompressOptions, compress
from deltastore.format import load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.methods import Method
from deltastore.sources import open_finetune, open_model
from deltastore.testing import (
    reference_text,  # noqa: F401  (the server tests import it from here)
    reference_texts,
)
from server.app import ThreadedServer
from server.config import Settings
from tests.conftest import perturbed, save

N_EXTRA = 4  # v5..v8: with v0..v4, nine variants
TOKEN = "test-admin-token"
PROMPTS = ["the cat sat", "on a mat and", "ran", "then the cat ran on", "a"]
MAX_TOKENS = 12  # reference_text's default length too
N_VARIANTS = 5


@pytest.fixture(scope="session")
def variant_files(
    tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """v0..v4: real fine-tunes (large perturbations) compressed with darex-q, p = 0.5."""
    root = tmp_path_factory.mktemp("variants")
    base = open_model(tiny_dirs["base"])
    out = {}
    for i in range(N_VARIANTS):
        ft_dir = save(perturbed(base.load_model(), 0.6, seed=100 + i), root / f"ft{i}")
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=i, progress=False)
        delta = compress(base, open_finetune(base, ft_dir), opts)
        out[f"v{i}"] = root / f"v{i}.delta.safetensors"
        save_delta(out[f"v{i}"], delta)
    return out


@pytest.fixture(scope="session")
def materialized(tiny_dirs, variant_files, tmp_path_factory) -> dict[str | None, Path]:
    """Each variant materialized as a full model directory (None: the base)."""
    root = tmp_path_factory.mktemp("materialized")
    base = open_model(tiny_dirs["base"])
    dirs: dict[str | None, Path] = {None: tiny_dirs["base"]}
    for name, path in variant_files.items():
        dirs[name] = materialize(base, load_delta(path), root / name, progress=False)
    return dirs


@pytest.fixture(scope="session")
def references(materialized) -> dict[str | None, dict[str, str]]:
    """Greedy text per (variant, prompt) from the fine-tune materialized and loaded
    with transformers; None is the base."""
    return {name: reference_texts(d, PROMPTS) for name, d in materialized.items()}


class LiveServer(ThreadedServer):
    """A threaded server with an httpx client, and one that sends the admin token."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.admin = httpx.Client(
            base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def stop(self) -> None:
        self.client.close()
        self.admin.close()
        super().stop()


def make_settings(base: Path, store: Path, **kw: object) -> Settings:
    defaults: dict[str, object] = dict(
        base=base,
        store=store,
        device="cpu",
        dtype="float32",  # outputs are compared with fp32 transformers references
        admin_token=TOKEN,
        port=0,
        materialized_cache_bytes=150_000,  # one materialized variant of the tiny model
        max_batch_size=4,
        max_new_tokens=64,
        demo=False,
    )
    defaults.update(kw)
    return Settings(**defaults)  # type: ignore[arg-type]


@pytest.fixture
def live(tiny_dirs, variant_files, tmp_path) -> Iterator[LiveServer]:
    """A ready server whose store holds v0..v4."""
    store = tmp_path / "store"
    store.mkdir()
    for name, path in variant_files.items():
        shutil.copy(path, store / f"{name}.delta.safetensors")
    srv = LiveServer(make_settings(tiny_dirs["base"], store))
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def nine_variants(
    tiny_dirs: dict[str, Path],
    variant_files: dict[str, Path],
    references: dict[str | None, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Path], dict[str | None, dict[str, str]]]:
    """v0..v4 of the shared fixture plus v5..v8 built the same way: their files and
    the greedy reference text of every (variant, prompt), None being the base."""
    root = tmp_path_factory.mktemp("more-variants")
    base = open_model(tiny_dirs["base"])
    files, refs = dict(variant_files), dict(references)
    for i in range(N_VARIANTS, N_VARIANTS + N_EXTRA):
        name = f"v{i}"
        ft_dir = save(perturbed(base.load_model(), 0.6, seed=100 + i), root / f"ft{i}")
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=i, progress=False)
        delta = compress(base, open_finetune(base, ft_dir), opts)
        files[name] = root / f"{name}.delta.safetensors"
        save_delta(files[name], delta)
        mat = materialize(base, load_delta(files[name]), root / f"mat{i}", progress=False)
        refs[name] = reference_texts(mat, PROMPTS)
    assert len(files) >= 9
    return files, refs
