"""The soak's variants (fine-tunes of a tiny base with their references from
transformers), the server settings it runs under, and the store it starts from."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from server.config import Settings

PROMPTS = ["the cat sat", "on a mat and", "then the cat ran on"]
MAX_TOKENS = 10
BURST_PROMPT = "the cat sat"
BURST_MAX_TOKENS = 32
DISCONNECT_PROMPT = "the cat sat on a mat"
DISCONNECT_MAX_TOKENS = 200
ADMIN_TOKEN = "soak-admin-token"


@dataclass
class Variant:
    """A model clients query: its name, its delta file (None: the base), and the
    reference text of each (prompt, max_tokens) from transformers."""

    name: str
    file: Path | None
    refs: dict[tuple[str, int], str]
    churn: bool = False  # deleted and re-uploaded by the churner (404 while deleted)
    initially_present: bool = True


def soak_settings(base: Path, store: Path, **kw: Any) -> Settings:
    """A server for the soak: fp32 on the CPU (outputs are compared with fp32
    transformers), engine v2, 4 running slots and a queue of 8 (bursts overflow)."""
    values: dict[str, Any] = dict(
        base=base,
        store=store,
        device="cpu",
        dtype="float32",
        admin_token=ADMIN_TOKEN,
        host="127.0.0.1",
        port=0,
        materialized_cache_bytes=150_000,  # one materialized variant of the tiny model
        max_batch_size=4,
        queue_limit=8,
        max_new_tokens=DISCONNECT_MAX_TOKENS,
        demo=False,
    )
    values.update(kw)
    return Settings(**values)


def build_variants(
    base_dir: Path,
    work: Path,
    n_stable: int = 8,
    n_cycle: int = 2,
    n_extra: int = 2,
    jobs: list[tuple[str, int]] | None = None,
    progress: bool = True,
) -> list[Variant]:
    """The base, `n_stable` variants v0.. and the churned ones c0.. (delete and
    re-upload) and x0.. (extra uploads, absent at first): fine-tunes of the base
    perturbed as the test suite's (std 0.6·std(W)), compressed with DAREx-q (p = 0.5),
    their files under `work`, their references from the materialized fine-tune in
    plain transformers (`deltastore.testing.reference_text`)."""
    from deltastore.compress import CompressOptions, compress
    from deltastore.format import load_delta, save_delta
    from deltastore.materialize import materialize
    from deltastore.methods import Method
    from deltastore.sources import SafetensorsModel, open_finetune, open_model
    from deltastore.testing import perturbed, reference_text, save

    jobs = jobs or [*((p, MAX_TOKENS) for p in PROMPTS), (BURST_PROMPT, BURST_MAX_TOKENS)]
    base = open_model(base_dir)
    assert isinstance(base, SafetensorsModel)
    names = [f"v{i}" for i in range(n_stable)]
    names += [f"c{i}" for i in range(n_cycle)] + [f"x{i}" for i in range(n_extra)]
    out = [Variant(base_dir.name, None, {j: reference_text(base_dir, *j) for j in jobs})]
    work.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(tqdm(names, desc="variants and references", disable=not progress)):
        ft_dir = save(perturbed(base.load_model(), 0.6, seed=500 + i), work / f"ft-{name}")
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=i, progress=False)
        path = work / f"{name}.delta.safetensors"
        save_delta(path, compress(base, open_finetune(base, ft_dir), opts))
        mat = materialize(base, load_delta(path), work / f"mat-{name}", progress=False)
        refs = {j: reference_text(mat, *j) for j in jobs}
        shutil.rmtree(ft_dir)
        shutil.rmtree(mat)
        churn = name[0] in "cx"
        out.append(Variant(name, path, refs, churn=churn, initially_present=name[0] != "x"))
    return out


def fill_store(store: Path, variants: list[Variant]) -> None:
    """Copy the variants present at the start into the server's store directory."""
    store.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.file is not None and v.initially_present:
            shutil.copy(v.file, store / f"{v.name}.delta.safetensors")
