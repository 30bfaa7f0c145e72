"""The delta file: one safetensors file per fine-tune, never pickle.

Layout (format version 1). For every tensor the delta touches, by its name N in the base:

- sparse tensors: ``N::pos`` and ``N::val``, two uint8 blobs.
  ``pos`` holds the kept flat positions, strictly increasing, as gaps
  (``g0 = p0``, ``gk = pk - p(k-1)``) written one byte each with 255 as the
  "add 255 and continue" escape, then zlib-compressed. At p = 0.99 this is
  ~1.02 bytes per position, against the 1.01 of the mask's entropy.
  ``val`` holds the kept entries of the delta *before* rescaling, as bf16 (fp32
  where bf16 would overflow), byte-shuffled (all low bytes, then all high bytes)
  and zlib-compressed: ~1.4 bytes per value. bf16's rounding (<= 0.4% of a kept
  value) is hundreds of times below the noise pruning itself adds at high p, and
  real SFT deltas (|delta| ~ 1e-4) would sit in fp16's subnormal range.
- dense tensors (norms, biases by default): ``N::dense``, an fp32 tensor.

The rescale (1/q) is per tensor in the metadata, so it is exactly 1/q and never
baked into rounded values. The JSON metadata (``__metadata__["deltaserve"]``)
also carries the base fingerprint, method, p, q, q-search record, seed, the fidelity
estimate made when it was compressed (``fidelity``, absent in older files, which read
as before), per-tensor counts, and a sha256 over every stored byte
(``payload_sha256``). Format 2 adds ``__metadata__["deltaserve_sha256"]``, the
sha256 of the metadata JSON exactly as stored: one checksum chain over metadata (each
tensor's scale included) and payload, so a truncated or corrupted file is refused
instead of silently producing a wrong model. Format 1 files (payload checksum only) are still read.

Decoding is bounded: every zlib stream inflates to at most the size its metadata
implies, and a caller can check the metadata (names, shapes, base) before any
payload is decoded (`load_delta(path, check=...)`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_KEY = "deltaserve"
META_SHA_KEY = "deltaserve_sha256"
POSITION_CODEC = "gap8-zlib"
VALUE_CODEC = "shuffle-zlib"
_ESCAPE = 255


class DeltaFormatError(ValueError):
    """A delta file that cannot be trusted: truncated, corrupted, foreign or inconsistent."""


# --------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class TensorDelta:
    """The kept entries of one tensor's delta.

    positions: (k,) int64 flat indices into the tensor, strictly increasing.
    values:    (k,) fp16/fp32 kept delta entries, not yet rescaled.
    scale:     multiplier applied at apply time (1/q; 1 for dense tensors).
    """

    name: str
    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor
    scale: float
    dense: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return int(self.positions.numel())

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.values.nbytes

    @classmethod
    def from_dense(cls, name: str, delta: torch.Tensor) -> TensorDelta:
        flat = delta.detach().reshape(-1).to(torch.float32)
        positions = torch.arange(flat.numel(), dtype=torch.int64)
        return cls(name, tuple(delta.shape), positions, flat, 1.0, dense=True)

    def to_dense(self) -> torch.Tensor:
        """The rescaled delta as a dense fp32 tensor (for tests and materialize)."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.positions] = self.values.to(torch.float32) * self.scale
        return out.view(self.shape)


class TensorMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: list[int]
    kind: Literal["sparse", "dense"]
    count: int = Field(ge=0)
    scale: float
    value_dtype: Literal["bfloat16", "float32"]


class DeltaMeta(BaseModel):
    """Everything about a delta except its numbers. Validated when a file is read."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format_version: int = FORMAT_VERSION
    base_fingerprint: str
    base_numel: int = Field(default=0, ge=0)  # entries of the whole base (for size ratios)
    method: str
    rate: float = Field(ge=0.0, lt=1.0)
    q: float | None = None
    q_search: dict[str, Any] | None = None
    mix_top: float | None = None  # method mix: share of the kept entries chosen by magnitude
    # deltastore.fidelity.Estimate as a dict: what the variant keeps of its fine-tune,
    # estimated without labels when it was compressed (absent in older files)
    fidelity: dict[str, Any] | None = None
    seed: int | None = None
    policy: dict[str, Any] = Field(default_factory=dict)
    source: str = ""
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tool_version: str = ""
    tensors: dict[str, TensorMeta] = Field(default_factory=dict)
    payload_sha256: str = ""


@dataclass(frozen=True)
class Delta:
    """A decoded delta: metadata plus the kept entries per tensor name."""

    meta: DeltaMeta
    tensors: dict[str, TensorDelta] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(t.count for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# --------------------------------------------------------------------------- codecs


def encode_positions(positions: np.ndarray) -> bytes:
    """(k,) strictly increasing int64 -> zlib(gap bytes)."""
    gaps = np.diff(positions, prepend=0).astype(np.int64)
    escapes = gaps // _ESCAPE
    ends = np.cumsum(escapes + 1) - 1  # index of each gap's terminating byte
    out = np.full(int(ends[-1]) + 1 if ends.size else 0, _ESCAPE, dtype=np.uint8)
    out[ends] = (gaps % _ESCAPE).astype(np.uint8)
    return zlib.compress(out.tobytes(), 6)


def _inflate(blob: bytes, limit: int, name: str, what: str) -> bytes:
    """zlib-decompress at most `limit` bytes: a stream that would inflate beyond what
    the metadata allows is refused without being inflated (no zip bombs)."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob, limit + 1)
    except zlib.error as e:
        raise DeltaFormatError(f"{name}: {what} stream is corrupted ({e})") from e
    if len(raw) > limit or d.unconsumed_tail:
        raise DeltaFormatError(f"{name}: {what} stream inflates beyond {limit} bytes")
    if not d.eof:
        raise DeltaFormatError(f"{name}: {what} stream is truncated")
    return raw


def decode_positions(blob: bytes, count: int, numel: int, name: str) -> np.ndarray:
    """Inverse of encode_positions, validating count, bounds and uniqueness."""
    # each position is one byte plus one escape per 255 of its gap; gaps sum to < numel
    raw = np.frombuffer(_inflate(blob, count + numel // _ESCAPE + 1, name, "position"), np.uint8)
    if raw.size and raw[-1] == _ESCAPE:
        raise DeltaFormatError(f"{name}: position stream is truncated (ends inside a gap)")
    # The sum of all bytes up to the k-th terminator is the k-th position.
    positions = np.cumsum(raw, dtype=np.int64)[raw != _ESCAPE]
    if positions.size != count:
        raise DeltaFormatError(f"{name}: {positions.size} positions stored, metadata says {count}")
    if count and positions[-1] >= numel:
        raise DeltaFormatError(
            f"{name}: position {int(positions[-1])} out of bounds for {numel} entries"
        )
    if count > 1 and not np.all(positions[1:] != positions[:-1]):
        dup = int(positions[1:][positions[1:] == positions[:-1]][0])
        raise DeltaFormatError(f"{name}: duplicate position {dup}")
    return positions


def storage_values(values: torch.Tensor) -> torch.Tensor:
    """The values as they are stored: bf16, or fp32 where bf16 would overflow."""
    v32 = values.detach().to(torch.float32).cpu()
    v16 = v32.to(torch.bfloat16)
    return v16 if bool(torch.isfinite(v16).all()) else v32


def encode_values(values: torch.Tensor) -> tuple[bytes, str]:
    """(k,) float -> (zlib(byte-shuffled storage values), dtype name)."""
    v = storage_values(values)
    shuffled = v.view(torch.uint8).reshape(-1, v.element_size()).T.contiguous()
    return zlib.compress(shuffled.numpy().tobytes(), 6), str(v.dtype).removeprefix("torch.")


_VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def decode_values(blob: bytes, count: int, dtype: str, name: str) -> torch.Tensor:
    torch_dtype = _VALUE_DTYPES[dtype]
    size = torch.empty(0, dtype=torch_dtype).element_size()
    raw = _inflate(blob, count * size, name, "value")
    if len(raw) != count * size:
        raise DeltaFormatError(f"{name}: {len(raw)} value bytes stored, expected {count * size}")
    # flatten to 1-D bytes before the dtype view: a 2-D view of (1, size) keeps a
    # stride of 1 on its size-1 dim, which the view refuses
    # .copy(): a fresh, writable, C-ordered array (the zlib output buffer is read-only)
    unshuffled = np.frombuffer(raw, dtype=np.uint8).reshape(size, count).T.copy()
    values = torch.from_numpy(unshuffled.reshape(-1)).view(torch_dtype)
    if not bool(torch.isfinite(values).all()):
        raise DeltaFormatError(f"{name}: non-finite values")
    return values


# --------------------------------------------------------------------------- files


def payload_digest(blobs: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(blobs):
        h.update(key.encode())
        h.update(blobs[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def encode_delta(delta: Delta) -> tuple[dict[str, torch.Tensor], dict[str, TensorMeta]]:
    blobs: dict[str, torch.Tensor] = {}
    metas: dict[str, TensorMeta] = {}
    for name in sorted(delta.tensors):
        t = delta.tensors[name]
        if t.dense:
            blobs[f"{name}::dense"] = t.values.detach().to(torch.float32).cpu().reshape(t.shape)
            metas[name] = TensorMeta(
                shape=list(t.shape),
                kind="dense",
                count=t.numel,
                scale=t.scale,
                value_dtype="float32",
            )
            continue
        pos = encode_positions(t.positions.cpu().numpy().astype(np.int64))
        val, dtype = encode_values(t.values)
        blobs[f"{name}::pos"] = torch.frombuffer(bytearray(pos), dtype=torch.uint8)
        blobs[f"{name}::val"] = torch.frombuffer(bytearray(val), dtype=torch.uint8)
        metas[name] = TensorMeta(
            shape=list(t.shape),
            kind="sparse",
            count=t.count,
            scale=t.scale,
            value_dtype=dtype,  # type: ignore[arg-type]
        )
    return blobs, metas


def save_delta(path: str | os.PathLike[str], delta: Delta) -> DeltaMeta:
    """Write `delta` atomically (temp file + rename). Returns the metadata written."""
    path = Path(path)
    blobs, metas = encode_delta(delta)
    meta = delta.meta.model_copy(
        update={"tensors": metas, "payload_sha256": "", "format_version": FORMAT_VERSION}
    )
    meta = meta.model_copy(update={"payload_sha256": payload_digest(blobs)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    raw = meta.model_dump_json()
    try:
        save_file(blobs, tmp, metadata={META_KEY: raw, META_SHA_KEY: sha256_text(raw)})
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename or unlink), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(path: str | os.PathLike[str]) -> DeltaMeta:
    """Read and validate only the metadata (cheap; the payload is not checked)."""
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DeltaFormatError(f"{path}: not a readable safetensors file ({e})") from e
    raw, sha = header.get(META_KEY), header.get(META_SHA_KEY)
    if raw is None:
        raise DeltaFormatError(f"{path}: a safetensors file, but not a deltaserve delta")
    if sha is not None and sha != sha256_text(raw):
        raise DeltaFormatError(f"{path}: metadata checksum mismatch, the file is corrupted")
    try:
        meta = DeltaMeta.model_validate(json.loads(raw))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise DeltaFormatError(
            f"{path}: invalid delta metadata ({e.error_count()} errors; first: {where}: "
            f"{first['msg']}, got {first.get('input')!r})"
        ) from e
    except ValueError as e:
        raise DeltaFormatError(f"{path}: invalid delta metadata ({e})") from e
    if meta.format_version not in READABLE_VERSIONS:
        raise DeltaFormatError(
            f"{path}: format version {meta.format_version}, this deltaserve reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if meta.format_version >= 2 and sha is None:
        raise DeltaFormatError(f"{path}: the metadata checksum is missing")
    for name, tm in meta.tensors.items():
        numel = math.prod(tm.shape)
        if any(d < 0 for d in tm.shape) or tm.count > numel:
            raise DeltaFormatError(f"{name}: {tm.count} entries for shape {tm.shape}")
        if tm.kind == "dense" and tm.count != numel:
            raise DeltaFormatError(f"{name}: dense with {tm.count} of {numel} entries")
    return meta


def load_delta(
    path: str | os.PathLike[str], check: Callable[[DeltaMeta], None] | None = None
) -> Delta:
    """Read, verify (checksums, counts, bounds, uniqueness, finiteness) and decode a
    delta. `check(meta)` runs before any payload is read (e.g. against the base)."""
    meta = read_meta(path)
    if check is not None:
        check(meta)
    try:
        # numpy, then torch: safetensors' framework="pt" reader leaks a little memory
        # per tensor read (seen with safetensors 0.8 and torch 2.13), which a server
        # reading deltas for days would feel; the numpy reader does not
        with safe_open(str(path), framework="np") as f:
            blobs = {k: torch.from_numpy(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DeltaFormatError(f"{path}: payload unreadable ({e})") from e
    expected = set()
    for name, tm in meta.tensors.items():
        expected |= {f"{name}::dense"} if tm.kind == "dense" else {f"{name}::pos", f"{name}::val"}
    if set(blobs) != expected:
        missing, extra = sorted(expected - set(blobs)), sorted(set(blobs) - expected)
        raise DeltaFormatError(f"{path}: tensor set mismatch (missing {missing}, extra {extra})")
    if payload_digest(blobs) != meta.payload_sha256:
        raise DeltaFormatError(f"{path}: checksum mismatch, the file is corrupted")
    tensors = {name: _decode_tensor(name, tm, blobs) for name, tm in meta.tensors.items()}
    return Delta(meta=meta, tensors=tensors)


def _decode_tensor(name: str, tm: TensorMeta, blobs: dict[str, torch.Tensor]) -> TensorDelta:
    shape = tuple(tm.shape)
    numel = math.prod(shape)
    if not math.isfinite(tm.scale):
        raise DeltaFormatError(f"{name}: non-finite scale {tm.scale}")
    if tm.kind == "dense":
        dense = blobs[f"{name}::dense"]
        if tuple(dense.shape) != shape:
            raise DeltaFormatError(f"{name}: dense shape {tuple(dense.shape)} != {shape}")
        if not torch.isfinite(dense).all():
            raise DeltaFormatError(f"{name}: non-finite values")
        return TensorDelta.from_dense(name, dense)
    pos = decode_positions(blobs[f"{name}::pos"].numpy().tobytes(), tm.count, numel, name)
    val = decode_values(blobs[f"{name}::val"].numpy().tobytes(), tm.count, tm.value_dtype, name)
    return TensorDelta(name, shape, torch.from_numpy(pos), val, tm.scale)
