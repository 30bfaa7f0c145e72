"""The delta subcommands of `deltaserve`: compress, inspect, recommend, materialize."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from deltastore.apply import BaseMismatchError
from deltastore.calib import DEFAULT_OBJECTIVE, Objective, parse_objective
from deltastore.compress import CompressOptions, Compressor
from deltastore.fidelity import RATES, THRESHOLD, Estimate, format_rates
from deltastore.format import Delta, DeltaMeta, load_delta, save_delta
from deltastore.hub import resolve_ref
from deltastore.materialize import materialize
from deltastore.merge import MergeMethod, merge
from deltastore.methods import MIX_TOP, Method, check_rate, parse_method
from deltastore.progress import show_progress
from deltastore.qsearch import (
    QGrid,
    QGroups,
    QSearch,
    parse_q_grid,
    parse_q_groups,
    parse_q_search,
)
from deltastore.recommend import Recommendation, delta_stats, natural_key, recommend
from deltastore.sources import (
    LoraFinetune,
    SafetensorsModel,
    fingerprint,
    open_finetune,
    open_model,
)

SUFFIX = ".delta.safetensors"


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that keeps the parser's own error message."""

    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_commands(sub: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="fine-tune -> DARE/DAREx sparse delta file",
        description="Compute the fine-tune's delta against BASE tensor by tensor (fp32, "
        "streamed from mmapped files), prune it, and write one safetensors delta file.",
    )
    _add_models(c)
    _add_output(c, "delta file to write")
    c.add_argument(
        "--method",
        type=_arg(parse_method),
        choices=list(Method),
        default=Method.DAREX_Q,
        help="how entries are kept: dare and darex-q keep each with probability 1-p "
        "(rescaled by 1/(1-p), or 1/q); magnitude keeps the largest; wanda the largest "
        "|delta| x input norm per row; structural drops whole input columns; mix keeps the "
        "largest and a random sample of the rest",
    )
    c.add_argument("--rate", type=float, required=True, help="drop probability p in [0, 1)")
    c.add_argument("--q", type=float, help="rescale by 1/q (darex-q, or to rescale other masks)")
    c.add_argument(
        "--q-search",
        type=_arg(parse_q_search),
        choices=list(QSearch),
        help="search q instead of giving it: on labels (--val), on calibration text "
        "(--calib), or per layer from the DAREx bound (analytical)",
    )
    c.add_argument(
        "--eta-search",
        type=_arg(parse_q_search),
        choices=[QSearch.UNLABELLED, QSearch.LABELLED],
        default=QSearch.UNLABELLED,
        help="how the analytical search scores eta (default: unlabelled)",
    )
    c.add_argument(
        "--calib", type=Path, help="calibration text file (unlabelled, analytical, wanda)"
    )
    c.add_argument("--val", type=Path, help='validation JSONL of {"prompt", "answer"} (labelled)')
    _add_calibration(c)
    c.add_argument(
        "--val-limit", type=int, default=64, help="validation examples used (default 64)"
    )
    c.add_argument(
        "--q-grid",
        type=_arg(parse_q_grid),
        choices=list(QGrid),
        default=CompressOptions.q_grid,
        help="global q grid: log (the default: log2(q/(1-p)) at step 1/2, then 1/8), "
        "linear (step --q-step, then 1/10 of it) or multiples (the DAREx paper's: "
        "k(1-p) for k = 1..30)",
    )
    c.add_argument(
        "--q-step", type=float, default=0.05, help="linear grid's coarse q step (default 0.05)"
    )
    c.add_argument("--q-max", type=float, default=1.0, help="upper end of the q grid (default 1)")
    c.add_argument(
        "--q-objective",
        type=_arg(parse_objective),
        choices=list(Objective),
        default=DEFAULT_OBJECTIVE,
        help="what an unlabelled q search minimises: generated-kl (default: the KL "
        "divergence from the fine-tune on its own greedy replies to the calibration "
        "prompts; kl on a text with no prompt in the chat format), kl (on the whole "
        "calibration text), weighted-kl (positions weighted by how far the fine-tune "
        "moved there), agreement (the share of the replies' tokens reproduced), "
        "logit-mse (the DAREx paper's: MSE of the fine-tune's top-5 logits) or "
        "hidden-mse (every layer's hidden state)",
    )
    c.add_argument(
        "--q-groups",
        type=_arg(parse_q_groups),
        choices=list(QGroups),
        default=QGroups.NONE,
        help="after the global q search, refine one q per group: none (default), module "
        "(q_proj, ..., down_proj) or depth (quarters of the layers)",
    )
    c.add_argument(
        "--mix-top",
        type=float,
        default=MIX_TOP,
        help=f"mix: share of the kept entries chosen by magnitude (default {MIX_TOP})",
    )
    c.add_argument(
        "--dense",
        action="append",
        default=[],
        metavar="REGEX",
        help="also store tensors whose name matches REGEX dense (repeatable)",
    )
    c.add_argument(
        "--search-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the one model a q search or calibration holds (bfloat16: half the memory)",
    )
    c.add_argument(
        "--stream-weights",
        action="store_true",
        help="read each module's weights from the files at every forward instead of "
        "holding the model: the calibration and the q search hold one module at a time "
        "(an 8B model compresses in a few GB), each pass reads the model again",
    )
    c.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    c.add_argument("--name", default="", help="source name recorded in the file")
    c.add_argument(
        "--no-estimate",
        action="store_true",
        help="skip the fidelity estimate (with --calib, compress estimates what the variant "
        "keeps of the fine-tune from its greedy continuations of the calibration text)",
    )
    c.add_argument(
        "--force",
        action="store_true",
        help=f"overwrite OUTPUT if it exists, and write a variant whose fidelity estimate is "
        f"below {100 * THRESHOLD:.0f}%% of the fine-tune's gain (refused otherwise)",
    )
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser(
        "inspect",
        help="show a delta file's metadata and size",
        description="Verify a delta file and print what it holds.",
    )
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser(
        "recommend",
        help="delta statistics and the method to use",
        description="Measure the fine-tune's delta and name the pruning method "
        "the DAREx paper's pipeline picks for it, with the reason.",
    )
    _add_models(r)
    r.add_argument("--have-labels", action="store_true", help="you have a labelled validation set")
    r.add_argument(
        "--rate",
        type=_arg(lambda v: check_rate(float(v))),
        default=None,
        help="the drop rate you will use: name the method measured best there "
        "(default: recommend a rate too)",
    )
    r.add_argument(
        "--calib",
        type=Path,
        help="calibration text: compress at each candidate rate (highest first) and "
        "recommend the highest whose fidelity estimate keeps 90%% of the fine-tune's gain, "
        "printing the table (a compression per rate tried)",
    )
    _add_calibration(r)
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--tensors", action="store_true", help="also the per-tensor statistics")
    r.set_defaults(func=cmd_recommend)

    m = sub.add_parser(
        "materialize",
        help="base + delta -> HF model directory",
        description="Write base+delta as an ordinary Hugging Face model "
        "directory (safetensors), loadable with from_pretrained.",
    )
    _add_base(m, "base model: a safetensors model directory or a Hub id org/name")
    m.add_argument("delta", type=Path, help="delta file")
    _add_output(m, "directory to create")
    m.add_argument(
        "--force",
        action="store_true",
        help="replace OUTPUT if it holds a model directory (written aside, then swapped in)",
    )
    m.set_defaults(func=cmd_materialize)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a base on a task (the demos' and the fidelity study's code)",
        description="Fine-tune BASE on a built-in task (arith: two-digit additions; extract: "
        "a sentence -> JSON; topic: a sentence -> its topic) or on a JSONL file of "
        '{"prompt", "answer"} rows, through the chat template, with AdamW or AdamR (full '
        "weights) or a LoRA adapter. Writes an ordinary model directory (a PEFT adapter "
        "with --lora-r), plus calib.txt: held-out task text for `compress --calib`.",
    )
    _add_base(f, "base model: a safetensors model directory or a Hub id org/name")
    f.add_argument(
        "--task",
        required=True,
        help="arith | extract | topic | FILE.jsonl (also extract-v1, the study's first form)",
    )
    _add_output(f, "directory to create")
    f.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    f.add_argument("--lr", type=float, default=5e-5, help="learning rate (default 5e-5)")
    f.add_argument("--batch-size", type=int, default=8, help="rows per step")
    f.add_argument(
        "--max-len",
        type=int,
        default=96,
        help="tokens per example (default 96): a longer prompt loses its start; a row "
        "whose answer alone is longer is left out, with a warning",
    )
    f.add_argument(
        "--optimizer",
        choices=["adamw", "adamr"],
        default="adamw",
        help="adamr decays toward the base: its deltas prune better",
    )
    f.add_argument("--lora-r", type=int, default=0, help="> 0: a LoRA adapter of this rank")
    f.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 matmuls under autocast, weights and optimizer in fp32 (default: on when "
        "the CPU has native bf16, AVX-512 BF16 or AMX, where it is ~1.4x faster per step; "
        "off elsewhere, where it is slower)",
    )
    f.add_argument(
        "--freeze-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the token embedding (and a tied head) as the base's: ~1.2x faster per "
        "step, and the demos' recipe",
    )
    f.add_argument("--examples", type=int, default=512, help="training rows (built-in tasks)")
    f.add_argument("--seed", type=int, default=0, help="seeds the rows' order and the init")
    f.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    f.set_defaults(func=cmd_finetune)

    g = sub.add_parser(
        "merge",
        help="merge delta files of one base into one delta file (a composition)",
        description="Merge sparse deltas of one base: sum (task arithmetic, with weights), "
        "ties (trim, elect sign, disjoint mean) or dare-merge (re-drop and rescale each "
        "member, then sum). The result is an ordinary delta file; the server's compositions "
        "(model 'a+b', registered recipes) merge the same way. Member names are the file "
        "names without .delta.safetensors; the result does not depend on their order.",
    )
    _add_base(g, f"the base model the deltas were made against: {MODEL_REF}")
    g.add_argument("deltas", nargs="+", type=Path, help="member delta files")
    _add_output(g, "delta file to write")
    g.add_argument(
        "--method", default="sum", choices=[m.value for m in MergeMethod], help="default: sum"
    )
    g.add_argument(
        "--weights", help="comma-separated, one per member (default: 1 each)", default=None
    )
    g.add_argument(
        "--density",
        type=float,
        default=None,
        help="ties: fraction of each member's entries kept by magnitude (default 1); "
        "dare-merge: fraction kept at random (default 0.5)",
    )
    g.add_argument("--seed", type=int, default=0, help="dare-merge's re-drop seed")
    g.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    g.set_defaults(func=cmd_merge)


class FidelityRefused(ValueError):
    """compress would write a variant estimated to have lost its fine-tune."""


MODEL_REF = (
    "a Hugging Face model directory (safetensors), a GGUF file, or a Hub id org/name "
    "(through the Hugging Face cache; HF_HUB_OFFLINE, HF_TOKEN from the environment)"
)


def _add_base(p: argparse.ArgumentParser, help: str) -> None:
    """BASE and its --revision."""
    p.add_argument("base", help=help)
    p.add_argument("--revision", help="BASE's revision when it is a Hub id (branch, tag, commit)")


def _add_models(p: argparse.ArgumentParser) -> None:
    """BASE and FINETUNED, each with its revision."""
    _add_base(p, f"base model: {MODEL_REF}")
    p.add_argument("finetuned", help=f"fine-tuned model, or a PEFT LoRA adapter: {MODEL_REF}")
    p.add_argument("--finetuned-revision", help="FINETUNED's revision when it is a Hub id")


def _add_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", required=True, type=Path, help=what)


def _add_calibration(p: argparse.ArgumentParser) -> None:
    """How much calibration text is read, and in what lengths."""
    p.add_argument(
        "--calib-tokens", type=int, default=1024, help="calibration tokens (default 1024)"
    )
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")


def _base(args: argparse.Namespace) -> Path:
    return resolve_ref(args.base, args.revision)


def _finetuned(args: argparse.Namespace) -> Path:
    return resolve_ref(args.finetuned, args.finetuned_revision)


def cmd_compress(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists (use --force to overwrite)")
    opts = CompressOptions(
        method=args.method,
        rate=args.rate,
        q=args.q,
        q_search=args.q_search,
        seed=args.seed,
        dense_patterns=tuple(args.dense),
        calib=args.calib,
        val=args.val,
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        q_step=args.q_step,
        q_max=args.q_max,
        q_grid=args.q_grid,
        q_groups=args.q_groups,
        q_objective=args.q_objective,
        mix_top=args.mix_top,
        eta_search=args.eta_search,
        val_limit=args.val_limit,
        search_dtype=args.search_dtype,
        stream_weights=args.stream_weights,
        progress=show_progress(),
        source_name=args.name,
        fidelity=not args.no_estimate,
    )
    base = open_model(_base(args))
    ft = open_finetune(base, _finetuned(args))
    compressor = Compressor(base, ft)
    delta = compressor(opts)
    meta = delta.meta
    if meta.q_search:
        print(format_search(meta.q_search))
    est = None if meta.fidelity is None else Estimate.from_dict(meta.fidelity)
    print(format_fidelity(est, _why_none(opts, args.no_estimate)))
    if est is not None and est.below and not args.force:
        print(f"not written: below {THRESHOLD:.0%}; what `deltaserve recommend --calib` picks:")
        lower = tuple(r for r in RATES if r < opts.rate)
        rec = _recommendation(ft, False)
        if lower:
            rec = rec.by_estimate(compressor, opts, lower)
            print(format_rates(rec.estimates, rec.rate))
        raise FidelityRefused(
            f"{args.output} not written: the variant keeps an estimated {est.short()} of "
            f"the fine-tune's gain over the base, below {THRESHOLD:.0%}. "
            + (
                f"recommend picks {_flags(rec)} (estimated {_kept_at(rec)}); "
                if lower
                else "no lower rate to try; "
            )
            + "--force writes this one anyway"
        )
    meta = save_delta(args.output, delta)
    print(format_summary(args.output, meta, delta.count))
    return 0


def _kept_at(rec: Recommendation) -> str:
    row = next((r for r in rec.estimates if r.rate == rec.rate), None)
    return "-" if row is None or row.estimate is None else row.estimate.short()


def _why_none(opts: CompressOptions, skipped: bool) -> str:
    if skipped:
        return "--no-estimate"
    if opts.calib is None:
        return "it needs --calib FILE: prompts in the chat format"
    return (
        f"{opts.calib} holds no prompt in the chat format: each prompt followed by the chat "
        "template's reply header, as `deltaserve finetune` writes calib.txt"
    )


def format_fidelity(est: Estimate | None, why_none: str = "made without --calib") -> str:
    if est is None:
        return f"fidelity estimate: none ({why_none})"
    flag = f"  BELOW {THRESHOLD:.0%}" if est.below else ""
    return f"fidelity estimate: {est.describe()}{flag}"


def format_search(record: dict[str, Any]) -> str:
    param, obj = record["parameter"], record["objective"]
    lines = [f"q search ({record['mode']}): {param} vs {obj}", f"  {param:>12}  {obj:>14}"]
    for x, v in zip(record["grid"], record["values"], strict=True):
        mark = "  <- chosen" if x == record["best"] else ""
        lines.append(f"  {x:>12.6g}  {v:>14.6g}{mark}")
    if "evaluations" in record:
        lines.append(f"  {record['evaluations']} evaluations in {record['seconds']:.1f} s")
    if "groups" in record:
        g = record["groups"]
        lines.append(
            f"  then one q per {g['by']} group: {obj} {record['best_value']:.6g} -> "
            f"{g['best_value']:.6g} in {g['evaluations']} evaluations ({g['seconds']:.1f} s)"
        )
        lines += [f"  {name:>24}  q = {q:.6g}" for name, q in g["q"].items()]
    if record["mode"] == "analytical":
        qs = list(record["layer_q"].values())
        lines.append(
            f"  per-layer q: {len(qs)} tensors, min {min(qs):.3f}, "
            f"mean {sum(qs) / len(qs):.3f}, max {max(qs):.3f}"
        )
    return "\n".join(lines)


def format_summary(path: Path, meta: DeltaMeta, kept: int) -> str:
    size = path.stat().st_size
    q = f"{meta.q:.4g}" if meta.q is not None else "per-tensor"
    lines = [
        f"{path}: {meta.method}{'' if meta.mix_top is None else f' (top {meta.mix_top:g})'} "
        f"p={meta.rate} q={q} seed={meta.seed}",
        f"  base        {meta.base_fingerprint}",
        f"  tensors     {len(meta.tensors)} ({meta.policy.get('dense_tensors', 0)} dense)",
        f"  kept        {kept:,} entries",
        f"  file        {size:,} bytes, {size / max(kept, 1):.2f} bytes per kept entry",
    ]
    dense = 2 * meta.base_numel
    if dense:
        lines.append(
            f"  vs dense    {100 * size / dense:.2f}% of the fine-tune in bf16 ({dense:,} B)"
        )
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    delta: Delta = load_delta(args.file)  # full verification, not just the header
    meta = delta.meta
    if args.json:
        out = meta.model_dump(exclude={"tensors"} if not args.tensors else set())
        out |= {"file_bytes": args.file.stat().st_size, "kept": delta.count}
        print(json.dumps(out, indent=2))
        return 0
    print(format_summary(args.file, meta, delta.count))
    print(f"  created     {meta.created} by deltaserve {meta.tool_version} from {meta.source!r}")
    est = None if meta.fidelity is None else Estimate.from_dict(meta.fidelity)
    print(f"  {format_fidelity(est)}")
    if meta.q_search:
        print(format_search(meta.q_search))
    if args.tensors:
        for name, tm in meta.tensors.items():
            print(f"  {name:<50} {tm.kind:<6} {tm.count:>10,} scale={tm.scale:.4g} {tm.shape}")
    return 0


def _recommendation(
    ft: Any, have_labels: bool, rate: float | None = None, progress: bool = False
) -> Recommendation:
    return recommend(delta_stats(ft, progress), have_labels, isinstance(ft, LoraFinetune), rate)


def _flags(rec: Recommendation) -> str:
    extra = "" if rec.q_objective == DEFAULT_OBJECTIVE else f" --q-objective {rec.q_objective}"
    extra += "" if rec.q_groups == "none" else f" --q-groups {rec.q_groups}"
    return f"--method {rec.method} --q-search {rec.q_search}{extra} --rate {rec.rate}"


def cmd_recommend(args: argparse.Namespace) -> int:
    base = open_model(_base(args))
    ft = open_finetune(base, _finetuned(args))
    rec = _recommendation(ft, args.have_labels, args.rate, show_progress())
    if args.calib is not None:
        template = CompressOptions(
            Method.DAREX_Q,
            rec.rate,
            q=0.5,
            calib=args.calib,
            calib_tokens=args.calib_tokens,
            seq_len=args.seq_len,
            progress=show_progress(),
        )
        rates = RATES if args.rate is None else (args.rate,)
        labelled = rec.q_search
        rec = rec.by_estimate(Compressor(base, ft), template, rates)
        if args.have_labels:  # the estimate needs no labels; the search can use them
            rec = replace(rec, q_search=labelled)
    if args.json:
        out = rec.as_dict()
        if not args.tensors:
            out.pop("tensors")
        print(json.dumps(out, indent=2))
        return 0
    print(f"recommended: {_flags(rec)}")
    print(f"  method: {rec.reason}")
    print(f"  rate:   {rec.rate_reason}")
    if rec.estimates:
        print(f"fidelity estimate at each rate tried ({rec.method}, unlabelled q search):")
        print(format_rates(rec.estimates, rec.rate))
    elif args.rate is None:
        print("  (--calib FILE checks the rate with the fidelity estimate on your text)")
    print("  (if you control fine-tuning: train with deltastore.AdamR (L2) and use darex-q)")
    print(
        f"delta: mean |delta| {rec.mean_abs:.3e}, std {rec.std:.3e}, max |delta| "
        f"{rec.max_abs:.3e}, mean |delta| / mean |base| {rec.relative:.2e}, the largest 1% "
        f"hold {rec.top_energy:.1%} of its energy, "
        f"over {len(rec.tensors)} tensors" + ("" if args.tensors else " (--tensors lists them)")
    )
    if args.tensors:
        print(f"{'tensor':<50} {'mean|d|':>10} {'std':>10} {'max|d|':>10} {'top 1%':>7}")
        for s in sorted(rec.tensors, key=lambda t: natural_key(t.name)):
            print(
                f"{s.name:<50} {s.mean_abs:>10.3e} {s.std:>10.3e} {s.max_abs:>10.3e} "
                f"{s.top_energy:>7.1%}"
            )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from deltastore.calib import load_examples
    from deltastore.finetune import FinetuneConfig, finetune, format_prompt, native_bf16
    from deltastore.tasks import TASKS, splits

    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists (use --force to replace it)")
    if args.task in TASKS:
        train, held_out, _ = splits(args.task, n_train=args.examples)
    else:
        path = Path(args.task)
        if not path.is_file():
            raise FileNotFoundError(
                f"--task {args.task}: not a built-in task ({', '.join(TASKS)}) nor a file"
            )
        rows = load_examples(path, 1_000_000)
        train, held_out = rows, rows[: max(len(rows) // 8, 1)]
    cfg = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        lora_r=args.lora_r,
        bf16=native_bf16() if args.bf16 is None else args.bf16,
        train_embeddings=not args.freeze_embeddings,
    )
    if args.force and args.output.exists():
        shutil.rmtree(args.output)
    base = _base(args)
    out = finetune(base, train, args.output, cfg, progress=True, desc="fine-tune")
    # the held-out prompts as the fine-tune sees them (the chat format, no answers): the
    # q search's calibration text, and the prompts the fidelity estimate replies to
    tokenizer = open_model(base).load_tokenizer()
    prompts = [format_prompt(tokenizer, e.prompt, cfg.chat) for e in held_out]
    (out / "calib.txt").write_text("\n".join(prompts) + "\n")
    print(out)
    return 0


def member_name(path: Path) -> str:
    name = path.name
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else path.stem


def cmd_merge(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.force:
        raise FileExistsError(f"{args.output} exists (use --force to overwrite)")
    weights = [1.0] * len(args.deltas)
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise ValueError(f"--weights: not numbers ({args.weights!r})") from e
        if len(weights) != len(args.deltas):
            raise ValueError(f"--weights: {len(weights)} weights for {len(args.deltas)} deltas")
    base = open_model(_base(args))
    fp = fingerprint(base)
    members = []
    for path, w in zip(args.deltas, weights, strict=True):
        delta = load_delta(path)
        if delta.meta.base_fingerprint != fp:
            raise BaseMismatchError(f"{path}: made against another base than {args.base}")
        members.append((member_name(path), delta, w))
    merged = merge(members, MergeMethod(args.method), args.density, args.seed)
    meta = save_delta(args.output, merged)
    print(format_summary(args.output, meta, merged.count))
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    base = open_model(_base(args))
    if not isinstance(base, SafetensorsModel):
        raise ValueError(f"{args.base}: materialize needs a safetensors model directory")
    out: Path = args.output
    busy = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if busy and not args.force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    if busy and not _is_model_dir(out):
        raise FileExistsError(
            f"{out} is not a model directory (no config.json and safetensors): "
            "refusing to replace it, even with --force"
        )
    delta = load_delta(args.delta)  # verified before anything is written
    if not busy:
        print(materialize(base, delta, out, show_progress()))
        return 0
    # written aside and swapped in: a failure leaves the old directory as it was
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        materialize(base, delta, tmp, show_progress())
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)
    return 0


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors*"))
