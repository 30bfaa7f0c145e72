"""The demo variants: two real fine-tunes of the embedded base, compressed with
DAREx-q at p = 0.99 (q searched on the task's own held-out text), copied into the
store when it lacks them.

Both are shipped in the package (`deltastore/data/demos/`, 3-4 MB each), named by
their recipe and the base's fingerprint, so a first run only checks and copies
them: a shipped file is used when its name matches the recipe and the embedded
base's fingerprint and its contents verify (checksums, positions, values, the
base fingerprint in its metadata). Otherwise (another base, a changed recipe) the
demo is made as before, with progress bars, and cached under the cache dir.
`python -m deltastore.demo --rebuild` makes them anew and compares them with the
shipped files; `--ship` writes them into the package.

The recipe is sized for a first run on 2 CPU cores (about 25 s per demo): a few
AdamW steps at a high learning rate, bf16 matmuls (fast on a CPU with native bf16,
AVX512-BF16 or AMX; slower elsewhere), the embedding frozen, and a q search on 128
calibration tokens. Both score >= 0.98 on their held-out test split
(BENCHMARKS.md, "First run"). The tasks are ones a 135M base can learn in that
budget: it cannot learn two-digit addition in minutes of CPU fine-tuning (about 0.7
after 30 steps, no better after 60), so arithmetic is not a demo."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from deltastore.calib import Objective
from deltastore.compress import CompressOptions, compress
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.format import (
    FORMAT_VERSION,
    Delta,
    DeltaFormatError,
    load_delta,
    read_meta,
    save_delta,
)
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.qsearch import QSearch
from deltastore.sources import fingerprint, open_finetune, open_model
from deltastore.store import DeltaStore
from deltastore.tasks import splits

log = logging.getLogger(__name__)


DEMO_FINETUNE = FinetuneConfig(bf16=True, train_embeddings=False, seed=0)
RATE = 0.99


@dataclass(frozen=True)
class Demo:
    """A task fine-tune of the base, compressed: its recipe names its cache file, so
    a changed recipe is made again rather than served stale."""

    name: str
    task: str  # a key of deltastore.tasks.TASKS
    about: str
    config: FinetuneConfig
    calib_tokens: int = 128

    def cache_path(self, base_dir: Path) -> Path:
        """Keyed by the recipe and the base's fingerprint: a demo made for one base is
        never installed for another."""
        base = fingerprint(open_model(base_dir))
        recipe = [base, self.task, asdict(self.config), RATE, self.calib_tokens]
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "demo" / f"{self.name}-{key}.delta.safetensors"


DEMOS = (
    Demo(
        "json-extract",
        "extract",
        "turns a sentence about a person into one line of JSON",
        replace(DEMO_FINETUNE, steps=6, lr=1e-4),
    ),
    Demo(
        "topic",
        "topic",
        "names the topic of a sentence: food, money, music, sports or weather",
        replace(DEMO_FINETUNE, steps=8, lr=2e-4, batch_size=4),
    ),
)


def shipped_dir() -> Path:
    """Where the package keeps the demos made for the embedded base."""
    return Path(str(files("deltastore") / "data" / "demos"))


def shipped_delta(demo: Demo, base_dir: Path) -> Path | None:
    """The shipped file of this recipe for this base, if there is one and it verifies
    (its metadata names this base's fingerprint, every checksum holds); else None."""
    path = shipped_dir() / demo.cache_path(base_dir).name
    if not path.is_file():
        return None
    try:
        made_for = load_delta(path).meta.base_fingerprint  # every check, as an upload
    except (DeltaFormatError, OSError) as e:
        log.warning("shipped demo %s does not verify (%s): making it instead", path.name, e)
        return None
    base = fingerprint(open_model(base_dir))
    if made_for != base:
        log.warning("shipped demo %s was made for %s, not %s: making it", path.name, made_for, base)
        return None
    return path


def demo_delta(demo: Demo, base_dir: Path, progress: bool = True, rebuild: bool = False) -> Path:
    """The demo's delta file: the shipped one when it matches the recipe and base,
    else the cached one, else made (fine-tune + compress). `rebuild` makes it anew."""
    out = demo.cache_path(base_dir)
    if not rebuild:
        shipped = shipped_delta(demo, base_dir)
        if shipped is not None:
            return shipped
    if out.is_file() and not rebuild:
        if read_meta(out).format_version < FORMAT_VERSION:  # cached by an older release
            save_delta(out, load_delta(out))  # the same delta, with the newer checksums
        return out
    log.info("making demo %r for %s (fine-tune + compress)", demo.name, base_dir)
    root = cache_dir() / "demo" / "work"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f"{demo.name}-"))  # one per build
    try:
        train, val, _ = splits(demo.task)  # the test split is what BENCHMARKS.md scores
        ft_dir = finetune(
            base_dir,
            train,
            work / "finetune",
            demo.config,
            progress=progress,
            desc=f"fine-tune demo '{demo.name}'",
        )
        calib = work / "calib.txt"
        calib.write_text("\n".join(f"{e.prompt} {e.answer}" for e in val))
        base = open_model(base_dir)
        opts = CompressOptions(
            method=Method.DAREX_Q,
            rate=RATE,
            q_search=QSearch.UNLABELLED,
            # the objective the demos' accuracy was measured with (BENCHMARKS.md,
            # "First run"); at p = 0.99 on these small deltas both pick about 1-p
            q_objective=Objective.LOGIT_MSE,
            calib=calib,
            calib_tokens=demo.calib_tokens,
            progress=progress,
            # no fidelity estimate: its calibration text (prompt and answer, as the demos'
            # first-run accuracy was measured with) holds no prompt in the chat format,
            # and the demos' accuracy is measured (BENCHMARKS.md, "First run")
            fidelity=False,
            source_name=f"demo:{demo.name}",
        )
        save_delta(out, compress(base, open_finetune(base, ft_dir), opts))  # atomic
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the 540 MB fine-tune: the delta is served
    return out


def compare(made: Delta, shipped: Delta) -> dict[str, Any]:
    """How a rebuilt demo differs from the shipped one: the kept positions (the mask
    is seeded by tensor name, so they match whenever the recipe does), the global q,
    and the kept values, as the largest and the median of |made - shipped| over the
    shipped value's magnitude (bf16 values: 2^-8 is one rounding step)."""
    if set(made.tensors) != set(shipped.tensors):
        return {"same_tensors": False}
    same_positions = all(
        torch.equal(made.tensors[n].positions, t.positions) for n, t in shipped.tensors.items()
    )
    out: dict[str, Any] = {
        "same_tensors": True,
        "same_positions": same_positions,
        "q": [made.meta.q, shipped.meta.q],
        "identical": same_positions
        and all(torch.equal(made.tensors[n].values, t.values) for n, t in shipped.tensors.items()),
    }
    if same_positions:
        rel = torch.cat(
            [
                (
                    (made.tensors[n].values.float() - t.values.float()).abs()
                    / t.values.float().abs().clamp_min(1e-12)
                ).reshape(-1)
                for n, t in shipped.tensors.items()
                if not t.dense and t.values.numel()
            ]
        )
        out["value_rel_diff_max"] = float(rel.max())
        out["value_rel_diff_median"] = float(rel.median())
        out["values_within_1pct"] = float((rel <= 0.01).float().mean())
    return out


def install_demos(base_dir: Path, store: DeltaStore, progress: bool = True) -> list[str]:
    """Copy the demo deltas into the store (never overwriting): the shipped ones when
    they match the base and recipe, else made (or cached) ones."""
    installed = []
    for demo in DEMOS:
        if store.exists(demo.name):  # the user's own, or an earlier release's: kept
            continue
        path = demo_delta(demo, base_dir, progress)
        if not store.exists(demo.name):
            upload = store.new_upload()
            shutil.copyfile(path, upload)
            store.commit(demo.name, upload, replace=False)
            installed.append(demo.name)
            log.info("demo variant %r (%s) installed in %s", demo.name, demo.about, store.root)
    return installed


def main(argv: list[str] | None = None) -> int:
    names = [d.name for d in DEMOS]
    ap = argparse.ArgumentParser(
        prog="python -m deltastore.demo",
        description="Make the demo variants' delta files (fine-tune + compress; what "
        "`deltaserve serve` does on a first run), cached under the cache dir, and print "
        "their paths.",
    )
    ap.add_argument("names", nargs="*", help=f"demos to make (default all: {', '.join(names)})")
    ap.add_argument("--base", type=Path, help="base model directory (default: the embedded base)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument(
        "--rebuild",
        action="store_true",
        help="make them anew (fine-tune + compress) even when shipped or cached, and "
        "compare each with the shipped file",
    )
    ap.add_argument(
        "--ship",
        action="store_true",
        help="make them anew and write them into the package (deltastore/data/demos), "
        "replacing the files of earlier recipes",
    )
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        ap.error(f"unknown demo {', '.join(unknown)} (known: {', '.join(names)})")
    if args.base is None:
        from deltastore.embedded import ensure_embedded_base

        args.base = ensure_embedded_base(progress=not args.no_progress)
    for demo in DEMOS:
        if args.names and demo.name not in args.names:
            continue
        shipped = shipped_dir() / demo.cache_path(args.base).name
        path = demo_delta(demo, args.base, not args.no_progress, args.rebuild or args.ship)
        if args.ship:
            for old in shipped_dir().glob(f"{demo.name}-*.delta.safetensors"):
                old.unlink()
            shipped.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, shipped)
            path = shipped
        elif args.rebuild and shipped.is_file():
            diff = compare(load_delta(path), load_delta(shipped))
            print(f"{demo.name}: rebuilt vs shipped: {json.dumps(diff)}", file=sys.stderr)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
