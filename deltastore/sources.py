"""Where weights come from: HF safetensors directories (single or sharded), GGUF
files and PEFT LoRA adapters, read one tensor at a time (mmap), never pickle.

A `ModelSource` is a base or a full fine-tune. A `FinetuneSource` yields the
fp32 delta of each tensor against a base, streaming: at most one tensor of each
model is in memory at a time, so a 7B fine-tune compresses on a 24 GB machine.
Tensor names are those of the transformers model; a tied ``lm_head.weight`` is
not a tensor of its own (one tensor, one delta).

A fine-tune must keep the base's vocabulary: every variant is served with the base's
tokenizer and its deltas have the base's shapes, so one that added tokens (a resized
embedding, or a tokenizer with tokens the base's lacks) is refused with the sizes and
tokens named (README, "Fine-tunes that add tokens", says how to serve them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from deltastore.paths import cache_dir

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"
TIED_EMBED_SUFFIX = "embed_tokens.weight"
_GGUF_MAGIC = b"GGUF"


class SourceError(ValueError):
    """A model or adapter that cannot be read, or that does not match its base."""


class ModelSource(ABC):
    """A set of named tensors plus the config that builds a model around them."""

    path: Path

    @property
    @abstractmethod
    def config(self) -> Any: ...

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        """A transformers model with these weights (on CPU)."""

    @abstractmethod
    def load_tokenizer(self) -> Any: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _drop_tied(self, names: list[str]) -> list[str]:
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        has_embed = any(n.endswith(TIED_EMBED_SUFFIX) for n in names)
        if tied and has_embed:
            return [n for n in names if n != TIED_HEAD]
        return names


class SafetensorsModel(ModelSource):
    """A Hugging Face model directory with ``model.safetensors`` or a sharded index."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise SourceError(f"{index}: unreadable shard index ({e})") from e
        elif (path / "model.safetensors").is_file():
            with _open_safetensors(path / "model.safetensors") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            found = sorted(p.name for p in path.iterdir())
            raise SourceError(
                f"{path}: no model.safetensors or model.safetensors.index.json "
                f"(found {found}); pickled checkpoints are not read"
            )
        self._weight_map = weight_map
        self._handles: dict[str, Any] = {}
        self._names = self._drop_tied(list(weight_map))

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SourceError(f"{self.path}: unreadable config.json ({e})") from e

    def files(self) -> list[Path]:
        return sorted({self.path / f for f in self._weight_map.values()})

    def _handle(self, name: str) -> Any:
        try:
            file = self._weight_map[name]
        except KeyError:
            raise SourceError(f"{self.path}: no tensor {name!r}") from None
        if file not in self._handles:
            self._handles[file] = _open_safetensors(self.path / file).__enter__()
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        from deltastore.shards import DTYPE_OF

        stored = self._handle(name).get_slice(name).get_dtype()
        if stored not in DTYPE_OF:
            raise SourceError(f"{self.path}: {name} has dtype {stored!r}, which is not read")
        return DTYPE_OF[stored]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.path, dtype=dtype, local_files_only=True
        ).eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, local_files_only=True)


class GGUFModel(ModelSource):
    """A GGUF file, dequantized by transformers (the whole model at once: GGUF files
    are quantized and small; convert large ones to safetensors first)."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        model = self.load_model()
        return {k: v.detach() for k, v in model.state_dict().items()}

    def names(self) -> list[str]:
        return self._drop_tied(list(self._state))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise SourceError(f"{self.path}: no tensor {name!r}") from None

    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.path.parent, gguf_file=self.path.name, dtype=dtype
            )
        except (OSError, ValueError) as e:
            raise SourceError(f"{self.path}: unreadable GGUF ({e})") from e
        return model.eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{path}: not a readable safetensors file ({e})") from e


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def open_model(path: str | os.PathLike[str]) -> ModelSource:
    """Open a base or full fine-tune: a HF safetensors directory or a GGUF file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{p}: no such file or directory")
    if p.is_file():
        if _is_gguf(p):
            return GGUFModel(p)
        raise SourceError(f"{p}: a file, but not GGUF; a model must be a directory or a .gguf")
    if (p / "adapter_config.json").is_file():
        raise SourceError(f"{p}: a LoRA adapter, not a full model (it can only be FINETUNED)")
    return SafetensorsModel(p)


# --------------------------------------------------------------------------- fine-tunes


class FinetuneSource(ABC):
    """A fine-tune of a given base, read as per-tensor fp32 deltas."""

    path: Path
    base: ModelSource

    @abstractmethod
    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(base tensor name, fp32 delta of that tensor's shape), streaming; tensors
        the fine-tune leaves unchanged may be skipped."""

    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        """The fine-tuned model itself (base plus every delta, unpruned)."""
        model = self.base.load_model(torch.float32)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, delta in self.deltas():
                params[name].add_(delta)
        return model.to(dtype)


VOCAB_HELP = (
    "a delta keeps the base's vocabulary; serve the fine-tune as a base of its own, or "
    "make a base that carries its tokens (README: Fine-tunes that add tokens)"
)


def _vocab_rows(source: ModelSource) -> int | None:
    embed = next((n for n in source.names() if n.endswith(TIED_EMBED_SUFFIX)), None)
    return source.shape(embed)[0] if embed is not None else None


def _tokenizer_vocab(load: Callable[[], Any]) -> dict[str, int] | None:
    """The tokenizer's token -> id map, or None when there is no tokenizer to read."""
    try:
        vocab: dict[str, int] = load().get_vocab()
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.debug("no tokenizer to compare: %s", e)
        return None
    return vocab


def check_vocabulary(
    base: ModelSource, path: Path, rows: int | None, tokenizer: Callable[[], Any]
) -> None:
    """Refuse a fine-tune (at `path`) whose embedding has `rows` rows where the base's
    has another number, or whose tokenizer has tokens the base's lacks or numbers
    differently (compared when both have one)."""
    base_rows = _vocab_rows(base)
    if rows is not None and base_rows is not None and rows != base_rows:
        raise SourceError(
            f"{path}: the fine-tune resized the vocabulary from {base_rows} to {rows} "
            f"tokens ({rows - base_rows:+d}); {VOCAB_HELP}"
        )
    mine = _tokenizer_vocab(tokenizer)
    theirs = _tokenizer_vocab(base.load_tokenizer) if mine is not None else None
    if mine is None or theirs is None:
        return
    added = sorted((i, t) for t, i in mine.items() if theirs.get(t) != i)
    if added:
        some = ", ".join(f"{t!r} (id {i})" for i, t in added[:5])
        raise SourceError(
            f"{path}: its tokenizer has {len(added)} tokens the base's lacks or numbers "
            f"differently ({some}); the server reads and writes text with the base's "
            f"tokenizer, so {VOCAB_HELP}"
        )


class FullFinetune(FinetuneSource):
    def __init__(self, base: ModelSource, finetuned: ModelSource):
        self.base, self.path, self._ft = base, finetuned.path, finetuned
        a = getattr(base.config, "model_type", None)
        b = getattr(finetuned.config, "model_type", None)
        if a != b:
            raise SourceError(f"architecture mismatch: base is {a!r}, fine-tune is {b!r}")
        check_vocabulary(base, self.path, _vocab_rows(finetuned), finetuned.load_tokenizer)
        base_names, ft_names = set(base.names()), set(finetuned.names())
        if base_names != ft_names:
            missing = sorted(base_names - ft_names)[:5]
            extra = sorted(ft_names - base_names)[:5]
            raise SourceError(
                f"tensor mismatch between base and fine-tune: missing in fine-tune {missing}, "
                f"not in base {extra}"
            )

    @property
    def finetuned(self) -> ModelSource:
        return self._ft

    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.base.names():
            b, f = self.base.get(name), self._ft.get(name)
            if b.shape != f.shape:
                raise SourceError(
                    f"{name}: shape {tuple(f.shape)} in fine-tune, {tuple(b.shape)} in base"
                )
            # fp32 arithmetic without a second fp32 copy (an 8B's embedding: 2 GB each)
            delta = f.to(torch.float32, copy=True)
            delta.sub_(b)
            del b, f  # not held while the caller prunes
            yield name, delta

    def load_model(self, dtype: torch.dtype = torch.float32) -> Any:
        return self._ft.load_model(dtype)


class LoraFinetune(FinetuneSource):
    """A PEFT LoRA adapter: delta = scale · B @ A per target module, with
    scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)."""

    _PREFIX = "base_model.model."
    _FACTORS = (".lora_A.weight", ".lora_B.weight")

    def __init__(self, base: ModelSource, path: Path):
        self.base, self.path = base, path
        try:
            cfg = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"{path}: unreadable adapter_config.json ({e})") from e
        if cfg.get("peft_type", "LORA") != "LORA":
            raise SourceError(f"{path}: PEFT type {cfg.get('peft_type')!r}, only LORA is read")
        for flag in ("use_dora",):
            if cfg.get(flag):
                raise SourceError(f"{path}: {flag}=true is not supported")
        if cfg.get("modules_to_save"):
            raise SourceError(
                f"{path}: modules_to_save {cfg['modules_to_save']} (full weights in an "
                "adapter) are not supported; merge the adapter and pass the model directory"
            )
        self._cfg = cfg
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise SourceError(f"{path}: no adapter_model.safetensors (pickled adapters not read)")
        try:
            self._tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise SourceError(f"{weights}: unreadable ({e})") from e
        self._modules = sorted(
            k[len(self._PREFIX) : -len(".lora_A.weight")]
            for k in self._tensors
            if k.startswith(self._PREFIX) and k.endswith(".lora_A.weight")
        )
        if not self._modules:
            raise SourceError(f"{weights}: no lora_A/lora_B weights found")
        other = sorted(k for k in self._tensors if not k.endswith(self._FACTORS))
        if other:
            raise SourceError(
                f"{weights}: tensors other than LoRA factors ({other[:3]}): trainable "
                "tokens, biases and saved modules are not read; merge the adapter into the "
                "model and pass the model directory"
            )
        check_vocabulary(base, path, None, lambda: _adapter_tokenizer(path))
        base_names = set(base.names())
        for m in self._modules:
            if f"{m}.weight" not in base_names:
                raise SourceError(f"{path}: adapter targets {m!r}, which the base does not have")

    def _scale(self, module: str, r: int) -> float:
        alpha = float(self._cfg.get("lora_alpha", r))
        for key, value in (self._cfg.get("alpha_pattern") or {}).items():
            if module == key or module.endswith(f".{key}"):
                alpha = float(value)
        return alpha / math.sqrt(r) if self._cfg.get("use_rslora") else alpha / r

    def delta(self, name: str) -> torch.Tensor | None:
        """The fp32 delta of base tensor `name`; None when the adapter leaves it alone."""
        m = name.removesuffix(".weight")
        if m == name or m not in self._modules:
            return None
        a = self._tensors[f"{self._PREFIX}{m}.lora_A.weight"].to(torch.float32)
        b = self._tensors.get(f"{self._PREFIX}{m}.lora_B.weight")
        if b is None:
            raise SourceError(f"{self.path}: {m} has lora_A but no lora_B")
        delta = self._scale(m, a.shape[0]) * (b.to(torch.float32) @ a)
        if self._cfg.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != self.base.shape(name):
            raise SourceError(
                f"{name}: LoRA delta shape {tuple(delta.shape)}, base {self.base.shape(name)}"
            )
        return delta

    def deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for m in self._modules:
            name = f"{m}.weight"
            delta = self.delta(name)
            assert delta is not None
            yield name, delta


def _adapter_tokenizer(path: Path) -> Any:
    """The tokenizer saved beside an adapter (an OSError when there is none)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise OSError(f"{path}: no tokenizer beside the adapter")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def open_finetune(base: ModelSource, path: str | os.PathLike[str]) -> FinetuneSource:
    p = Path(path).expanduser()
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return LoraFinetune(base, p)
    return FullFinetune(base, open_model(p))


# --------------------------------------------------------------------------- fingerprint


def fingerprint_tensors(names: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order; one tensor
    in memory at a time."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = get(name)
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return "sha256:" + h.hexdigest()


def _stamp(source: ModelSource) -> dict[str, list[int]]:
    files = source.files() if isinstance(source, SafetensorsModel) else [source.path]
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def fingerprint(source: ModelSource) -> str:
    """The base's identity, cached beside it (or under the cache dir when read-only,
    and always for a Hub snapshot: nothing is written into the Hub's cache)."""
    from deltastore.hub import in_hub_cache

    stamp = _stamp(source)
    if source.path.is_dir():
        beside = source.path / ".deltaserve-fingerprint.json"
    else:
        beside = source.path.parent / f".{source.path.name}.deltaserve-fingerprint.json"
    key = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:16]
    fallback = cache_dir() / "fingerprints" / f"{key}.json"
    candidates = (fallback,) if in_hub_cache(source.path) else (beside, fallback)
    for candidate in candidates:
        try:
            cached = json.loads(candidate.read_text())
            if cached.get("stamp") == stamp and cached.get("path") == str(source.path.resolve()):
                return str(cached["fingerprint"])
        except (OSError, ValueError, KeyError):
            continue
    fp = fingerprint_tensors(source.names(), source.get)
    record = json.dumps({"path": str(source.path.resolve()), "stamp": stamp, "fingerprint": fp})
    for candidate in candidates:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.write_text(record)
            break
        except OSError:
            continue
    return fp
