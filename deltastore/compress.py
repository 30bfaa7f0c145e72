"""`deltaserve compress`: fine-tune -> pruned delta file.

Stages, each with at most one whole model in memory:
1. (wanda, q search, fidelity estimate) calibration: (for the weighted KL) one pass
   of the base over the calibration text, to weigh positions by how far the
   fine-tune moved there; then one pass of the fine-tuned model: input statistics per
   Linear, its top-64 logits, and its greedy replies to the calibration prompts (the
   text cut after each chat reply header); each model is freed after its pass;
2. stream the fp32 deltas tensor by tensor, keep the mask's entries (and, for the
   analytical q, per-row statistics);
3. (q search) load the base and search q by applying the pruned delta under trial
   scales and reverting it exactly;
4. (fidelity estimate) the share of the fine-tune's replies the stored variant
   reproduces, against the base's (deltastore.fidelity).

`Compressor` keeps the calibration and the base model between compressions of one
fine-tune at several settings (recommend's rates).
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

from deltastore.apply import FlatWeights
from deltastore.calib import (
    DEFAULT_OBJECTIVE,
    FALLBACK_OBJECTIVE,
    Example,
    InputStats,
    Objective,
    Reference,
    collect,
    exact_match,
    generation_header,
    load_calibration,
    load_examples,
    load_prompts,
    log_probs,
    objectives,
)
from deltastore.fidelity import Agreement, Estimate, agreement, estimate
from deltastore.format import Delta, DeltaMeta, TensorDelta, storage_values
from deltastore.methods import (
    MIX_TOP,
    Method,
    check_mix_top,
    check_q,
    check_rate,
    default_q,
    select,
    select_mix,
    tensor_generator,
)
from deltastore.qsearch import (
    QGrid,
    QGroups,
    QSearch,
    RowStats,
    ScaledDeltaModel,
    SearchTrace,
    fix_values,
    global_scales,
    refine_groups,
    row_stats,
    search_eta,
    search_q,
    tensor_groups,
)
from deltastore.sources import FinetuneSource, ModelSource, fingerprint
from deltastore.streamed import StreamedDeltaModel, streamed

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
    q_groups: QGroups = QGroups.NONE  # after the global q: one q per group, refined
    mix_top: float = MIX_TOP
    eta_search: QSearch = QSearch.UNLABELLED
    q_objective: Objective = DEFAULT_OBJECTIVE  # what an unlabelled search minimises
    val_limit: int = 64
    search_dtype: str = "float32"  # bfloat16 halves the q search's memory (7B on 24 GB)
    # read each module's weights from the files at each forward instead of holding the
    # model (deltastore.streamed): one module in memory, the model re-read per pass
    stream_weights: bool = False
    progress: bool = True
    source_name: str = ""
    fidelity: bool = True  # estimate what the variant keeps (with calibration text)

    def __post_init__(self) -> None:
        check_rate(self.rate)
        if self.q is not None:
            check_q(self.q)
        if self.method is Method.DARE and (self.q is not None or self.q_search is not None):
            raise ValueError("dare rescales by exactly 1/(1-p); for another q use darex-q")
        check_mix_top(self.mix_top)
        if self.mix_top != MIX_TOP and self.method is not Method.MIX:
            raise ValueError(f"--mix-top applies to --method mix, not {self.method}")
        unlabelled = self.q_search is QSearch.UNLABELLED or (
            self.q_search is QSearch.ANALYTICAL and self.eta_search is QSearch.UNLABELLED
        )
        if self.q_objective is not DEFAULT_OBJECTIVE and not unlabelled:
            raise ValueError("--q-objective applies to an unlabelled q search")
        if self.q_groups is not QGroups.NONE and self.q_search not in (
            QSearch.LABELLED,
            QSearch.UNLABELLED,
        ):
            raise ValueError("--q-groups refines a labelled or unlabelled q search")
        if self.method is Method.MIX and self.q_search is QSearch.ANALYTICAL:
            # the bound's grid starts at 1-p and assumes every entry was dropped at random
            raise ValueError("mix takes --q or a labelled or unlabelled --q-search")
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
    def start_q(self) -> float:
        """The q before any search: the given one, else the method's default."""
        return self.q if self.q is not None else default_q(self.method, self.rate, self.mix_top)

    @property
    def q_min(self) -> float:
        """The smallest q searched: the random part's keep rate (DARE's q for darex-q)."""
        if self.method is Method.MIX:
            return default_q(Method.MIX, self.rate, self.mix_top)
        return 1.0 - self.rate

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

    @property
    def estimates(self) -> bool:
        """A fidelity estimate comes with the delta (it needs calibration text)."""
        return self.fidelity and self.calib is not None

    @property
    def objective_in_use(self) -> Objective | None:
        """What an unlabelled search (or eta search) minimises; None without one."""
        unlabelled = self.q_search is QSearch.UNLABELLED or (
            self.q_search is QSearch.ANALYTICAL and self.eta_search is QSearch.UNLABELLED
        )
        return self.q_objective if unlabelled else None

    def calibration_key(self) -> tuple[Any, ...]:
        """What the calibration pass depends on: equal keys share one."""
        o = self.objective_in_use
        return (
            self.calib if (self.needs_calib or self.estimates) else None,
            self.calib_tokens,
            self.seq_len,
            self.search_dtype,
            self.needs_val and self.val,
            self.val_limit,
            o is Objective.HIDDEN,
            o is not None and o.needs_base,
            self.estimates or (o is not None and o.on_continuations),
        )

    def is_dense(self, name: str, delta: torch.Tensor) -> bool:
        return delta.dim() < 2 or any(re.search(p, name) for p in self.dense_patterns)


@dataclass
class Calibration:
    ids: torch.Tensor | None = None
    reference: Reference | None = None
    stats: InputStats | None = None
    examples: list[Example] = field(default_factory=list)
    base_agreement: Agreement | None = None  # the estimate's floor (filled when first used)
    # what an unlabelled search minimises on this calibration: the one asked for, or,
    # for the default on a text with no prompt in the chat format, FALLBACK_OBJECTIVE
    objective: Objective | None = None


def _calibrate(
    base: ModelSource, ft: FinetuneSource, opts: CompressOptions, tokenizer: Any
) -> Calibration:
    cal = Calibration()
    if opts.needs_val:
        assert opts.val is not None
        cal.examples = load_examples(opts.val, opts.val_limit)
    if not (opts.needs_calib or opts.estimates):
        return cal
    assert opts.calib is not None
    dtype = getattr(torch, opts.search_dtype)
    cal.ids = load_calibration(opts.calib, tokenizer, opts.calib_tokens, opts.seq_len)
    o = opts.objective_in_use
    prompts = None
    if opts.estimates or (o is not None and o.on_continuations):
        prompts = load_prompts(opts.calib, tokenizer)
        if not prompts and o is not None and o.on_continuations:
            if o is not DEFAULT_OBJECTIVE:
                raise ValueError(
                    f"--q-objective {o}: {opts.calib} holds no prompt in the chat format "
                    "(text that holds the chat template's reply header "
                    f"{generation_header(tokenizer)!r})"
                )
            log.warning(
                "%s holds no prompt in the chat format: the q search minimises %s, not %s",
                opts.calib,
                FALLBACK_OBJECTIVE,
                o,
            )
            o = FALLBACK_OBJECTIVE
    cal.objective = o
    base_lp = None
    if o is not None and o.needs_base:
        log.info("calibration: %s tokens through the base", cal.ids.numel())
        model = _load(base, opts, dtype)
        base_lp = log_probs(model, cal.ids)
        del model
        gc.collect()
    log.info("calibration: %s tokens through the fine-tuned model", cal.ids.numel())
    model = _load(ft, opts, dtype)
    cal.reference, cal.stats = collect(
        model,
        cal.ids,
        hidden=o is Objective.HIDDEN,
        base=base_lp,
        prompts=prompts,
    )
    del model, base_lp
    gc.collect()
    return cal


def _load(source: ModelSource | FinetuneSource, opts: CompressOptions, dtype: torch.dtype) -> Any:
    """`source`'s model in `dtype`: resident, or streamed from its files."""
    return streamed(source, dtype) if opts.stream_weights else source.load_model(dtype)


@dataclass
class Pruned:
    tensors: list[TensorDelta]
    rows: dict[str, RowStats]  # the analytical q's statistics
    policy: dict[str, Any]
    # mix: which kept entries are the magnitude part; their tensors hold raw fp32
    # values until `bake` folds them for the chosen scale
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)

    def bake(self, scales: dict[str, float]) -> list[TensorDelta]:
        """The tensors as stored, under per-tensor scales (missing: the current one)."""
        out = []
        for t in self.tensors:
            s = scales.get(t.name, t.scale) if not t.dense else t.scale
            mask = self.fixed.get(t.name)
            values = t.values if mask is None else storage_values(fix_values(t.values, mask, s))
            out.append(TensorDelta(t.name, t.shape, t.positions, values, s, t.dense))
        return out


def prune_deltas(ft: FinetuneSource, opts: CompressOptions, cal: Calibration) -> Pruned:
    q0 = opts.start_q
    tensors, rows, dense_names = [], {}, []
    fixed: dict[str, torch.Tensor] = {}
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
        gen = tensor_generator(opts.seed, name)
        if opts.method is Method.MIX:
            positions, fixed[name] = select_mix(delta, opts.rate, gen, opts.mix_top)
            values = delta.reshape(-1)[positions].to(torch.float32)
        else:
            positions = select(opts.method, delta, opts.rate, gen, norms)
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
    return Pruned(tensors, rows, policy, fixed)


def _search(
    trial: ScaledDeltaModel | StreamedDeltaModel,
    rows: dict[str, RowStats],
    tokenizer: Any,
    opts: CompressOptions,
    cal: Calibration,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Returns per-tensor q and the search record for the metadata."""
    assert opts.q_search is not None
    tensors = trial.tensors
    objective = cal.objective or opts.objective_in_use or DEFAULT_OBJECTIVE

    def score(scales: dict[str, float], how: QSearch) -> float:
        with trial.scaled(scales) as m:
            if how is QSearch.LABELLED:
                return exact_match(m, tokenizer, cal.examples)
            assert cal.ids is not None and cal.reference is not None
            return objectives(m, cal.ids, cal.reference, (objective,))[objective]

    def minimise(how: QSearch) -> bool:
        return how is not QSearch.LABELLED and objective.minimise

    sparse = [t.name for t in tensors if not t.dense]
    if opts.q_search is QSearch.ANALYTICAL:
        how = opts.eta_search
        trace = SearchTrace("eta", _objective_name(how, objective), minimise(how))
        eta, qs = search_eta(
            lambda s: score(s, how), rows, tensors, opts.rate, trace, opts.progress
        )
        record = {"mode": "analytical", "eta": eta, **trace.as_dict(), "layer_q": qs}
        return qs, record
    how = opts.q_search
    trace = SearchTrace("q", _objective_name(how, objective), minimise(how))
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
        opts.q_min,
    )
    record = {
        "mode": how.value,
        "q_grid": opts.q_grid.value,
        "direction": "down" if downward else "up",
        **trace.as_dict(),
    }
    if opts.q_groups is QGroups.NONE:
        return dict.fromkeys(sparse, best), record
    groups = tensor_groups(sparse, opts.q_groups)
    g_trace = SearchTrace("evaluation", trace.objective, trace.minimise)
    group_q = refine_groups(
        lambda qs: score({n: 1.0 / q for n, q in qs.items()}, how),
        groups,
        best,
        opts.q_min,
        max(opts.q_min, opts.q_max),
        g_trace,
        opts.progress,
    )
    record["groups"] = {
        "by": opts.q_groups.value,
        "q": group_q,
        "values": [v for _, v in g_trace.points],
        "best_value": g_trace.best[1],
        "evaluations": len(g_trace.points) - 1,  # the first is the global q again
        "seconds": round(g_trace.seconds, 2),
    }
    return {n: group_q[g] for g, names in groups.items() for n in names}, record


def _objective_name(how: QSearch, objective: Objective) -> str:
    return "exact_match" if how is QSearch.LABELLED else objective.value.replace("-", "_")


class Compressor:
    """Compresses one fine-tune against one base, at one or more settings: the
    calibration pass and the base model (with its weights in flat buffers, for trial
    deltas) are made once and kept between calls."""

    def __init__(self, base: ModelSource, ft: FinetuneSource):
        self.base, self.ft = base, ft
        self._tokenizer: Any = None
        self._calibrations: dict[tuple[Any, ...], Calibration] = {}
        self._model: tuple[str, Any, FlatWeights] | None = None  # (dtype, model, weights)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.base.load_tokenizer()
        return self._tokenizer

    def calibration(self, opts: CompressOptions) -> Calibration:
        key = opts.calibration_key()
        if key not in self._calibrations:
            self._model = None  # one whole model at a time: the calibration loads two
            gc.collect()
            tokenizer = self.tokenizer() if (opts.needs_calib or opts.estimates) else None
            self._calibrations[key] = _calibrate(self.base, self.ft, opts, tokenizer)
        return self._calibrations[key]

    def model(self, opts: CompressOptions) -> tuple[Any, FlatWeights]:
        """The base in the search dtype, its weights re-homed in flat buffers."""
        if self._model is None or self._model[0] != opts.search_dtype:
            self._model = None
            gc.collect()
            model = self.base.load_model(getattr(torch, opts.search_dtype))
            self._model = (opts.search_dtype, model, FlatWeights.from_module(model))
        return self._model[1], self._model[2]

    def trial(
        self,
        opts: CompressOptions,
        tensors: list[TensorDelta],
        fixed: dict[str, torch.Tensor] | None = None,
    ) -> ScaledDeltaModel | StreamedDeltaModel:
        """The base under trial scales of `tensors`: resident (kept between calls) or
        streamed from its files."""
        if opts.stream_weights:
            return StreamedDeltaModel(self.base, getattr(torch, opts.search_dtype), tensors, fixed)
        model, weights = self.model(opts)
        return ScaledDeltaModel(model, tensors, fixed, weights)

    def __call__(self, opts: CompressOptions) -> Delta:
        """Compress with `opts` into a decoded `Delta` (save it with save_delta)."""
        cal = self.calibration(opts)
        pruned = prune_deltas(self.ft, opts, cal)
        if not pruned.tensors:
            raise ValueError("the fine-tune is identical to the base: nothing to compress")
        q: float | None = opts.start_q
        record = None
        scales: dict[str, float] = {}
        if opts.q_search is not None:
            trial = self.trial(opts, pruned.tensors, pruned.fixed)
            qs, record = _search(trial, pruned.rows, self.tokenizer(), opts, cal)
            scales = {n: 1.0 / v for n, v in qs.items()}
            distinct = set(qs.values())
            q = distinct.pop() if len(distinct) == 1 else None
        tensors = pruned.bake(scales)
        kept = self._estimate(tensors, opts, cal) if opts.estimates else None
        meta = DeltaMeta(
            base_fingerprint=fingerprint(self.base),
            base_numel=sum(math.prod(self.base.shape(n)) for n in self.base.names()),
            method=opts.method.value,
            rate=opts.rate,
            q=q,
            q_search=record,
            seed=opts.seed,
            policy=pruned.policy,
            source=opts.source_name or self.ft.path.name,
            tool_version=tool_version(),
            mix_top=opts.mix_top if opts.method is Method.MIX else None,
            fidelity=None if kept is None else kept.as_dict(),
        )
        return Delta(meta, {t.name: t for t in tensors})

    def _estimate(
        self, tensors: list[TensorDelta], opts: CompressOptions, cal: Calibration
    ) -> Estimate | None:
        """The fidelity estimate of the variant exactly as stored (bf16 values); None
        when the calibration text holds no prompt in the chat format."""
        assert cal.reference is not None
        cont = cal.reference.continuations
        if cont is None:
            return None
        trial = self.trial(opts, tensors)
        if cal.base_agreement is None:
            cal.base_agreement = agreement(trial.model, cont)
        with trial.scaled({}) as variant_model:
            variant = agreement(variant_model, cont)
        return estimate(variant, cal.base_agreement, cont)


def compress(base: ModelSource, ft: FinetuneSource, opts: CompressOptions) -> Delta:
    """Compress `ft` against `base` into a decoded `Delta` (save it with save_delta)."""
    return Compressor(base, ft)(opts)
