"""`deltaserve materialize`: base + delta -> an ordinary Hugging Face model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from deltastore.apply import BaseMismatchError
from deltastore.format import Delta, TensorDelta
from deltastore.sources import SafetensorsModel, SourceError, fingerprint

SHARD_BYTES = 4 << 30
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
    """Write base+delta shard by shard (one shard in memory at a time)."""
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
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tqdm(base.names(), desc="materialize", disable=not progress):
        t = base.get(name)
        if name in delta.tensors:
            t = add_tensor_delta(t, delta.tensors[name])
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.nbytes for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
