"""Any fine-tune -> a delta with `recommend`'s defaults: what the server runs for
vLLM's `load_lora_adapter`, `--lora-modules` and an upload by reference.

A reference is a PEFT LoRA adapter directory, a full fine-tune (a model directory
or a GGUF file) or a delta file. A delta file is verified and taken as it is (it
must be made against this base); the others are measured (`recommend`: method, q
search and rate) and compressed. The unlabelled q search calibrates on the
fine-tune's own `calib.txt` when it has one (what `deltaserve finetune` writes),
else on a short general text shipped with deltaserve.
"""

from __future__ import annotations

import hashlib
import logging
from importlib.resources import files
from pathlib import Path

from deltastore.apply import BaseMismatchError
from deltastore.calib import Objective
from deltastore.compress import CompressOptions, compress
from deltastore.format import Delta, DeltaFormatError, load_delta, read_meta
from deltastore.methods import Method
from deltastore.qsearch import QGroups, QSearch
from deltastore.recommend import Recommendation, delta_stats, recommend
from deltastore.sources import LoraFinetune, ModelSource, fingerprint, open_finetune

log = logging.getLogger(__name__)
CALIB_FILE = "calib.txt"  # beside a fine-tune: its own calibration text


def general_calibration() -> Path:
    """The calibration text used when a fine-tune brings none (~800 tokens of mixed
    prose, dialogue, code and Q&A)."""
    return Path(str(files("deltastore") / "data" / "calib.txt"))


def is_delta_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        read_meta(path)
    except (DeltaFormatError, OSError):
        return False
    return True


def stamp(path: Path) -> str:
    """What identifies a reference's content cheaply: each file's relative name, size
    and modification time (16 hex digits of their sha256)."""
    h = hashlib.sha256()
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in found:
        st, rel = p.stat(), p.name if p == path else p.relative_to(path)
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def recommended_options(
    rec: Recommendation, calib: Path, source: str, progress: bool
) -> CompressOptions:
    return CompressOptions(
        method=Method(rec.method),
        rate=rec.rate,
        q_search=QSearch(rec.q_search),
        q_objective=Objective(rec.q_objective),
        q_groups=QGroups(rec.q_groups),
        calib=calib,
        progress=progress,
        source_name=source,
    )


def to_delta(base: ModelSource, path: Path, source: str = "", progress: bool = False) -> Delta:
    """The delta of the fine-tune, adapter or delta file at `path` against `base`,
    compressed with recommend's defaults. Raises ValueError (SourceError,
    DeltaFormatError, BaseMismatchError) with the reason when it cannot be made."""
    if is_delta_file(path):
        delta = load_delta(path)  # every check: checksums, positions, values
        if delta.meta.base_fingerprint != fingerprint(base):
            raise BaseMismatchError(
                f"a delta made for another base ({delta.meta.base_fingerprint}, this "
                f"server's is {fingerprint(base)})"
            )
        return delta
    ft = open_finetune(base, path)
    rec = recommend(delta_stats(ft, progress), low_rank=isinstance(ft, LoraFinetune))
    own = path / CALIB_FILE if path.is_dir() else path.with_name(CALIB_FILE)
    calib = own if own.is_file() else general_calibration()
    log.info(
        "compressing %s: %s, q search %s, p = %g (recommend: %s); calibration %s",
        source or path,
        rec.method,
        rec.q_search,
        rec.rate,
        rec.reason,
        calib,
    )
    return compress(base, ft, recommended_options(rec, calib, source, progress))
