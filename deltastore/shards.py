"""Writing a model's weights as safetensors shards one tensor at a time: each shard's
header is written from the tensors' shapes and dtypes, then each tensor as it is
made, so memory holds one tensor, not a shard (an 8B model's shards are 4 GB each).
Several shards come with a ``model.safetensors.index.json``, as Hugging Face writes
them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

SHARD_BYTES = 4 << 30
INDEX = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF = {v: k for k, v in _DTYPES.items()}  # safetensors' names -> torch dtypes


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan(specs: list[Spec], shard_bytes: int = SHARD_BYTES) -> list[list[Spec]]:
    """The tensors, in order, cut into shards of at most shard_bytes (a tensor larger
    than that is a shard of its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header(specs: list[Spec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in _DTYPES:
            raise TypeError(f"{s.name}: dtype {s.dtype} has no safetensors name")
        header[s.name] = {
            "dtype": _DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_file(path: Path, specs: list[Spec], tensor: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file of `specs`, each tensor made by `tensor(name)` when its
    turn comes (checked against its spec)."""
    header = _header(specs)
    with path.open("wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for s in specs:
            t = tensor(s.name)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(
                    f"{s.name}: made {tuple(t.shape)} {t.dtype}, declared {s.shape} {s.dtype}"
                )
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_shards(
    out: Path,
    specs: list[Spec],
    tensor: Callable[[str], torch.Tensor],
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    desc: str = "write",
) -> list[Path]:
    """`model.safetensors`, or numbered shards and their index, in `out`."""
    shards = plan(specs, shard_bytes)
    bar = tqdm(total=sum(s.nbytes for s in specs), desc=desc, unit="B", unit_scale=True)
    bar.disable = not progress

    def made(name: str) -> torch.Tensor:
        t = tensor(name)
        bar.update(t.numel() * t.element_size())
        return t

    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    for fname, shard in zip(names, shards, strict=True):
        write_file(out / fname, shard, made)
    bar.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {
                s.name: f for f, shard in zip(names, shards, strict=True) for s in shard
            },
        }
        (out / INDEX).write_text(json.dumps(index, indent=2))
    return [out / n for n in names]
