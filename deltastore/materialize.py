"""`deltaserve materialize`: base + delta -> an ordinary Hugging Face model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from deltastore.apply import BaseMismatchError
from deltastore.format import Delta, TensorDelta
from deltastore.shards import SHARD_BYTES, Spec, write_shards
from deltastore.sources import SafetensorsModel, SourceError, fingerprint

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def add_tensor_delta(weight: torch.Tensor, delta: TensorDelta) -> torch.Tensor:
    """weight + delta as a new tensor, computed in fp32, in the weight's dtype."""
    flat = weight.detach().reshape(-1).to(torch.float32).clone()
    flat.index_add_(0, delta.positions, delta.values.to(torch.float32) * delta.scale)
    return flat.to(weight.dtype).view(weight.shape)


def _copy_side_files(base: SafetensorsModel, out: Path) -> None:
    for f in base.path.iterdir():
        weights = f.name.endswith(".safetensors") or f.name in _WEIGHT_FILES
        if f.is_file() and not weights and not f.name.startswith(".deltaserve"):
            shutil.copy2(f, out / f.name)


def materialize(base: SafetensorsModel, delta: Delta, out: Path, progress: bool = True) -> Path:
    """Write base+delta tensor by tensor (one tensor in memory at a time)."""
    if not isinstance(base, SafetensorsModel):
        raise SourceError(f"{base.path}: materialize needs a safetensors model directory as base")
    fp = fingerprint(base)
    if delta.meta.base_fingerprint != fp:
        raise BaseMismatchError(
            f"delta was made against base {delta.meta.base_fingerprint}, {base.path} is {fp}"
        )
    unknown = sorted(set(delta.tensors) - set(base.names()))
    if unknown:
        raise BaseMismatchError(f"delta touches tensors the base lacks: {unknown[:5]}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(base, out)
    specs = [Spec(n, base.shape(n), base.dtype(n)) for n in base.names()]

    def tensor(name: str) -> torch.Tensor:
        t = base.get(name)
        return add_tensor_delta(t, delta.tensors[name]) if name in delta.tensors else t

    write_shards(out, specs, tensor, SHARD_BYTES, progress, "materialize")
    return out
