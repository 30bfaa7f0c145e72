"""The demo variants: two real fine-tunes of the embedded base, made on first run
(progress bars), compressed with DAREx-q at p = 0.99 (q searched on the task's own
text), cached under the cache dir, and copied into the store when it lacks them."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltastore.calib import Example
from deltastore.compress import CompressOptions, compress
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.format import FORMAT_VERSION, load_delta, read_meta, save_delta
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.qsearch import QSearch
from deltastore.sources import open_finetune, open_model
from deltastore.store import DeltaStore
from deltastore.tasks import arithmetic, extraction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demo:
    name: str
    task: Callable[[int, int], list[Example]]
    about: str


DEMOS = (
    Demo("arith", arithmetic, "answers 'What is 12 + 34?' with the bare number"),
    Demo("json-extract", extraction, "turns a sentence about a person into one line of JSON"),
)
RATE = 0.99


def demo_delta(demo: Demo, base_dir: Path, progress: bool = True) -> Path:
    """The demo's delta file, made (fine-tune + compress) on first use."""
    out = cache_dir() / "demo" / f"{demo.name}.delta.safetensors"
    if out.is_file():
        if read_meta(out).format_version < FORMAT_VERSION:  # cached by an older release
            save_delta(out, load_delta(out))  # the same delta, with the newer checksums
        return out
    work = cache_dir() / "demo" / "work"
    ft_dir = finetune(
        base_dir,
        demo.task(512, 0),
        work / demo.name,
        FinetuneConfig(steps=30),
        progress=progress,
        desc=f"fine-tune demo '{demo.name}'",
    )
    calib = work / f"{demo.name}.calib.txt"
    calib.write_text("\n".join(f"{e.prompt} {e.answer}" for e in demo.task(64, 1)))
    base = open_model(base_dir)
    opts = CompressOptions(
        method=Method.DAREX_Q,
        rate=RATE,
        q_search=QSearch.UNLABELLED,
        calib=calib,
        calib_tokens=512,
        progress=progress,
        source_name=f"demo:{demo.name}",
    )
    save_delta(out, compress(base, open_finetune(base, ft_dir), opts))
    shutil.rmtree(ft_dir)  # 540 MB; the delta is what is served
    return out


def install_demos(base_dir: Path, store: DeltaStore, progress: bool = True) -> list[str]:
    """Make the demo deltas if needed and copy them into the store (never overwriting)."""
    installed = []
    for demo in DEMOS:
        path = demo_delta(demo, base_dir, progress)
        if not store.exists(demo.name):
            upload = store.new_upload()
            shutil.copyfile(path, upload)
            store.commit(demo.name, upload, replace=False)
            installed.append(demo.name)
            log.info("demo variant %r (%s) installed in %s", demo.name, demo.about, store.root)
    return installed
