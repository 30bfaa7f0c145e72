"""`deltaserve compress`: fine-tune -> pruned delta file.

Stages, each with at most one whole model in memory:
1. (wanda, q search) one pass of the fine-tuned model over calibration text: input
   statistics per Linear and the reference top-5 logits; the model is then freed;
2. stream the fp32 deltas tensor by tensor, keep the mask's entries (and, for the
   analytical q, per-row statistics);
3. (q search) load the base and search q by applying the pruned delta under trial
   scales and reverting it exactly.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deltastore.calib import (
    Example,
    InputStats,
    Reference,
    collect,
    exact_match,
    load_calibration,
    load_examples,
    logit_mse,
)
from deltastore.format import Delta, DeltaMeta, TensorDelta, storage_values
from deltastore.methods import (
    Method,
    check_q,
    check_rate,
    default_q,
    select,
    tensor_generator,
)
from deltastore.qsearch import (
    QGrid,
    QSearch,
    RowStats,
    ScaledDeltaModel,
    SearchTrace,
    global_scales,
    row_stats,
    search_eta,
    search_q,
)
from deltastore.sources import FinetuneSource, ModelSource, fingerprint

log = logging.getLogger(__name__)

# Which tensors are stored dense: vectors (norms, biases) are a rounding error of the
# file's size and every entry of them matters; every matrix, embeddings and a tied
# lm_head included, is pruned (dense embeddings would add ~21% of SmolLM2's size to
# each file). See BENCHMARKS.md, "Dense-tensor policy", for the measurement.
DEFAULT_POLICY = "vectors-dense"


def tool_version() -> str:
    try:
        return version("deltaserve")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class CompressOptions:
    method: Method
    rate: float
    q: float | None = None
    q_search: QSearch | None = None
    seed: int = 0
    dense_patterns: tuple[str, ...] = ()
    calib: Path | None = None
    val: Path | None = None
    calib_tokens: int = 1024
    seq_len: int = 128
    q_step: float = 0.05  # the linear grid's coarse step
    q_max: float = 1.0
    q_grid: QGrid = QGrid.LOG  # BENCHMARKS.md "Fidelity": as good or better, half the evals
    eta_search: QSearch = QSearch.UNLABELLED
    val_limit: int = 64
    search_dtype: str = "float32"  # bfloat16 halves the q search's memory (7B on 24 GB)
    progress: bool = True
    source_name: str = ""

    def __post_init__(self) -> None:
        check_rate(self.rate)
        if self.q is not None:
            check_q(self.q)
        if self.method is Method.DARE and (self.q is not None or self.q_search is not None):
            raise ValueError("dare rescales by exactly 1/(1-p); for another q use darex-q")
        if self.method is Method.DAREX_Q and self.q is None and self.q_search is None:
            raise ValueError("darex-q needs --q Q or --q-search labelled|unlabelled|analytical")
        if self.q is not None and self.q_search is not None:
            raise ValueError("give --q or --q-search, not both")
        if self.eta_search is QSearch.ANALYTICAL:
            raise ValueError("eta is searched labelled or unlabelled")
        if self.needs_val and self.val is None:
            raise ValueError("a labelled search needs --val FILE.jsonl")
        if self.needs_calib and self.calib is None:
            raise ValueError(f"{self.method} / {self.q_search} needs --calib FILE (text)")
        if self.search_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"search dtype must be float32 or bfloat16, got {self.search_dtype!r}")
        if not 0 < self.q_step < 1 or not 0 < self.q_max <= 1:
            raise ValueError(f"bad q grid: step {self.q_step}, max {self.q_max}")
        for pattern in self.dense_patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"--dense pattern {pattern!r}: {e}") from e

    @property
    def needs_val(self) -> bool:
        return self.q_search is QSearch.LABELLED or (
            self.q_search is QSearch.ANALYTICAL and self.eta_search is QSearch.LABELLED
        )

    @property
    def needs_calib(self) -> bool:
        return (
            self.method is Method.WANDA
            or self.q_search is QSearch.UNLABELLED
            or self.q_search is QSearch.ANALYTICAL
        )

    def is_dense(self, name: str, delta: torch.Tensor) -> bool:
        return delta.dim() < 2 or any(re.search(p, name) for p in self.dense_patterns)


@dataclass
class Calibration:
    ids: torch.Tensor | None = None
    reference: Reference | None = None
    stats: InputStats | None = None
    examples: list[Example] = field(default_factory=list)


def _calibrate(ft: FinetuneSource, opts: CompressOptions, tokenizer: Any) -> Calibration:
    cal = Calibration()
    if opts.needs_val:
        assert opts.val is not None
        cal.examples = load_examples(opts.val, opts.val_limit)
    if not opts.needs_calib:
        return cal
    assert opts.calib is not None
    cal.ids = load_calibration(opts.calib, tokenizer, opts.calib_tokens, opts.seq_len)
    log.info("calibration: %s tokens through the fine-tuned model", cal.ids.numel())
    model = ft.load_model(getattr(torch, opts.search_dtype))
    cal.reference, cal.stats = collect(model, cal.ids)
    del model
    gc.collect()
    return cal


def _prune(
    ft: FinetuneSource, opts: CompressOptions, cal: Calibration
) -> tuple[list[TensorDelta], dict[str, RowStats], dict[str, Any]]:
    q0 = opts.q if opts.q is not None else default_q(opts.method, opts.rate)
    tensors, rows, dense_names = [], {}, []
    names = ft.base.names()
    for name, delta in tqdm(ft.deltas(), total=len(names), desc="prune", disable=not opts.progress):
        if not torch.isfinite(delta).all():
            raise ValueError(f"{name}: the fine-tune's delta has non-finite entries")
        if not delta.any():
            continue  # tensor unchanged by the fine-tune: nothing to store
        if opts.is_dense(name, delta):
            tensors.append(TensorDelta.from_dense(name, delta))
            dense_names.append(name)
            continue
        norms = cal.stats.norms.get(name) if cal.stats else None
        positions = select(opts.method, delta, opts.rate, tensor_generator(opts.seed, name), norms)
        values = storage_values(delta.reshape(-1)[positions])
        tensors.append(TensorDelta(name, tuple(delta.shape), positions, values, 1.0 / q0))
        if opts.q_search is QSearch.ANALYTICAL and cal.stats and name in cal.stats.means:
            rows[name] = row_stats(delta, cal.stats.means[name])
    policy = {
        "name": DEFAULT_POLICY,
        "rule": "tensors with fewer than 2 dims, or matching a dense pattern, are stored dense",
        "dense_patterns": list(opts.dense_patterns),
        "dense_tensors": len(dense_names),
        "pruned_tensors": len(tensors) - len(dense_names),
        "unchanged_tensors": len(names) - len(tensors),
    }
    return tensors, rows, policy


def _search(
    base: ModelSource,
    tokenizer: Any,
    tensors: list[TensorDelta],
    rows: dict[str, RowStats],
    opts: CompressOptions,
    cal: Calibration,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Returns per-tensor q and the search record for the metadata."""
    assert opts.q_search is not None
    model = base.load_model(getattr(torch, opts.search_dtype))
    trial = ScaledDeltaModel(model, tensors)

    def score(scales: dict[str, float], how: QSearch) -> float:
        with trial.scaled(scales) as m:
            if how is QSearch.LABELLED:
                return exact_match(m, tokenizer, cal.examples)
            assert cal.ids is not None and cal.reference is not None
            return logit_mse(m, cal.ids, cal.reference)

    sparse = [t.name for t in tensors if not t.dense]
    if opts.q_search is QSearch.ANALYTICAL:
        how = opts.eta_search
        trace = SearchTrace("eta", _objective_name(how), how is not QSearch.LABELLED)
        eta, qs = search_eta(
            lambda s: score(s, how), rows, tensors, opts.rate, trace, opts.progress
        )
        record = {"mode": "analytical", "eta": eta, **trace.as_dict(), "layer_q": qs}
        return qs, record
    how = opts.q_search
    trace = SearchTrace("q", _objective_name(how), how is not QSearch.LABELLED)
    downward = default_q(opts.method, opts.rate) == 1.0  # importance masks start at q = 1
    best = search_q(
        lambda q: score(global_scales(tensors, q), how),
        opts.rate,
        opts.q_max,
        opts.q_step,
        opts.q_grid,
        trace,
        opts.progress,
        downward,
    )
    record = {
        "mode": how.value,
        "q_grid": opts.q_grid.value,
        "direction": "down" if downward else "up",
        **trace.as_dict(),
    }
    return dict.fromkeys(sparse, best), record


def _objective_name(how: QSearch) -> str:
    return "exact_match" if how is QSearch.LABELLED else "logit_mse"


def compress(base: ModelSource, ft: FinetuneSource, opts: CompressOptions) -> Delta:
    """Compress `ft` against `base` into a decoded `Delta` (save it with save_delta)."""
    tokenizer = base.load_tokenizer() if (opts.needs_calib or opts.needs_val) else None
    cal = _calibrate(ft, opts, tokenizer)
    tensors, rows, policy = _prune(ft, opts, cal)
    if not tensors:
        raise ValueError("the fine-tune is identical to the base: nothing to compress")
    q: float | None = opts.q if opts.q is not None else default_q(opts.method, opts.rate)
    record = None
    if opts.q_search is not None:
        qs, record = _search(base, tokenizer, tensors, rows, opts, cal)
        tensors = [
            t if t.dense else TensorDelta(t.name, t.shape, t.positions, t.values, 1.0 / qs[t.name])
            for t in tensors
        ]
        distinct = set(qs.values())
        q = distinct.pop() if len(distinct) == 1 else None
    meta = DeltaMeta(
        base_fingerprint=fingerprint(base),
        base_numel=sum(math.prod(base.shape(n)) for n in base.names()),
        method=opts.method.value,
        rate=opts.rate,
        q=q,
        q_search=record,
        seed=opts.seed,
        policy=policy,
        source=opts.source_name or ft.path.name,
        tool_version=tool_version(),
    )
    return Delta(meta, {t.name: t for t in tensors})
