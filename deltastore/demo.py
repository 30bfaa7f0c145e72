"""The demo variants: two real fine-tunes of the embedded base, made on first run
(progress bars), compressed with DAREx-q at p = 0.99 (q searched on the task's own
held-out text), cached under the cache dir, and copied into the store when it lacks
them.

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
from pathlib import Path

from deltastore.calib import Objective
from deltastore.compress import CompressOptions, compress
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.format import FORMAT_VERSION, load_delta, read_meta, save_delta
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


def demo_delta(demo: Demo, base_dir: Path, progress: bool = True) -> Path:
    """The demo's delta file, made (fine-tune + compress) on first use."""
    out = demo.cache_path(base_dir)
    if out.is_file():
        if read_meta(out).format_version < FORMAT_VERSION:  # cached by an older release
            save_delta(out, load_delta(out))  # the same delta, with the newer checksums
        return out
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


def install_demos(base_dir: Path, store: DeltaStore, progress: bool = True) -> list[str]:
    """Make the demo deltas if needed and copy them into the store (never overwriting)."""
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
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        ap.error(f"unknown demo {', '.join(unknown)} (known: {', '.join(names)})")
    if args.base is None:
        from deltastore.embedded import ensure_embedded_base

        args.base = ensure_embedded_base(progress=not args.no_progress)
    for demo in DEMOS:
        if not args.names or demo.name in args.names:
            print(demo_delta(demo, args.base, progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
