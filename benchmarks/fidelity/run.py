"""The study's run: each fine-tune compressed at every rate and method, each delta
scored on the task's test split through the engine's apply path, resumable."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.catalog import (
    FINETUNES,
    SCORE_BATCH,
    VARIANTS,
    make_finetune,
    task_files,
)
from deltastore.apply import FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.calib import Example, exact_match
from deltastore.compress import compress
from deltastore.embedded import ensure_embedded_base
from deltastore.format import TensorDelta, load_delta, save_delta
from deltastore.recommend import delta_stats, recommend
from deltastore.sources import FinetuneSource, ModelSource, fingerprint, open_finetune, open_model


class MemoryFinetune(FinetuneSource):
    """A fine-tune's deltas held in memory (read once, compressed many times)."""

    def __init__(self, ft: FinetuneSource):
        self.base, self.path, self._ft = ft.base, ft.path, ft
        self._deltas = list(ft.deltas())  # each delta is a fresh fp32 tensor

    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._deltas

    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        return self._ft.load_model(dtype)


class Scorer:
    """The base, resident once in fp32 flat buffers; a delta is scored by applying it
    in place, running the test split, and reverting it bit-exactly."""

    def __init__(self, base: ModelSource):
        self.tokenizer = base.load_tokenizer()
        self.model = base.load_model(torch.float32).eval()
        self.weights = FlatWeights.from_module(self.model, fingerprint=fingerprint(base))

    def __call__(self, tensors: list[TensorDelta] | None, test: list[Example]) -> float:
        if tensors is None:
            return exact_match(self.model, self.tokenizer, test, batch=SCORE_BATCH)
        undo = apply_delta_(self.weights, bind(tensors, self.weights))
        try:
            return exact_match(self.model, self.tokenizer, test, batch=SCORE_BATCH)
        finally:
            revert_delta_(self.weights, undo)


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def run(args: argparse.Namespace) -> None:
    base_dir = ensure_embedded_base()
    base = open_model(base_dir)
    scorer = Scorer(base)
    results = load_results(args.out)
    for ft_name in args.finetunes:
        task = FINETUNES[ft_name][0]
        test, calib, val = task_files(task, scorer.tokenizer, args.work)
        test = test[: args.n_test]
        if f"base|{task}" not in results:
            results[f"base|{task}"] = {"accuracy": scorer(None, test)}
            save_results(args.out, results)
        ft_dir = make_finetune(ft_name, base_dir, args.work)
        key = f"finetune|{ft_name}"
        ft = MemoryFinetune(open_finetune(base, ft_dir))
        if key not in results:
            dense = [TensorDelta.from_dense(n, d) for n, d in ft.deltas()]
            rec = recommend(delta_stats(ft, progress=False))
            results[key] = {
                "task": task,
                "accuracy": scorer(dense, test),
                "mean_abs_delta": rec.mean_abs,
                "relative_delta": rec.relative,
                "top_energy": rec.top_energy,
            }
            del dense
            save_results(args.out, results)
        if "top_energy" not in results[key]:  # a statistic added after the first runs
            results[key]["top_energy"] = recommend(delta_stats(ft, progress=False)).top_energy
            save_results(args.out, results)
        cells = [(r, v) for r in args.rates for v in args.methods]
        for rate, variant in tqdm(cells, desc=ft_name, unit="delta"):
            cell = f"{ft_name}|{variant}|{rate}"
            if cell in results:
                continue
            opts = VARIANTS[variant].options(rate, calib, val)
            out = (
                args.work
                / "deltas"
                / ft_name
                / f"{variant.replace('/', '_')}-{rate}.delta.safetensors"
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            meta = save_delta(out, compress(base, ft, replace(opts, source_name=ft_name)))
            seconds = time.perf_counter() - t0
            delta = load_delta(out)
            acc = scorer(list(delta.tensors.values()), test)
            search = meta.q_search or {}
            results[cell] = {
                "accuracy": acc,
                "file_bytes": out.stat().st_size,
                "q": meta.q,
                "compress_s": round(seconds, 1),
                "search_evals": len(search.get("grid", []))
                + search.get("groups", {}).get("evaluations", 0),
                "fidelity": meta.fidelity,  # the estimate compress recorded
            }
            if out.stat().st_size > 20e6:
                out.unlink()  # low-rate files are large; the result is what is kept
            save_results(args.out, results)
            tqdm.write(f"{cell}: {acc:.3f} ({seconds:.0f} s)")
