"""Calibration: token batches, per-layer input statistics, and the fine-tuned model's
reference logits that the unlabelled q search tries to keep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOP_K_LOGITS = 5


def load_calibration(path: Path, tokenizer: Any, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(n, seq_len) int64 token ids cut from a text file (at most n_tokens in all)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration file {path}: unreadable ({e})") from e
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq_len = min(seq_len, len(ids))
    if seq_len < 8:
        raise ValueError(f"calibration file {path}: {len(ids)} tokens, need at least 8")
    n = max(1, min(n_tokens // seq_len, len(ids) // seq_len))
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def load_examples(path: Path, limit: int) -> list[Example]:
    """A JSONL validation file of {"prompt", "answer"} objects."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"validation file {path}: unreadable ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(Example(str(obj["prompt"]), str(obj["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: need a JSON object with prompt and answer ({e})") from e
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"validation file {path}: no examples")
    return out


def _batches(ids: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, ids.shape[0], batch):
        yield ids[i : i + batch]


@dataclass(frozen=True)
class Reference:
    """The fine-tuned model's top-k logits per calibration token."""

    index: torch.Tensor  # (n, L, k) int64
    value: torch.Tensor  # (n, L, k) fp32


@dataclass(frozen=True)
class InputStats:
    """Per weight name (tied weights under their canonical name), over calibration
    tokens: the L2 norm and the mean of each input feature of its Linear."""

    norms: dict[str, torch.Tensor]  # name -> (in,) fp32
    means: dict[str, torch.Tensor]  # name -> (in,) fp32


def _linear_weight_names(model: nn.Module) -> dict[str, nn.Linear]:
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied: first name wins
    return {
        canonical[id(m.weight)]: m
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) in canonical
    }


@torch.no_grad()
def collect(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> tuple[Reference, InputStats]:
    """One pass of the (fine-tuned) model over the calibration tokens."""
    sq: dict[str, torch.Tensor] = {}
    sm: dict[str, torch.Tensor] = {}
    count = 0
    handles = []
    for name, lin in _linear_weight_names(model).items():

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], _o: Any, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            sm[name] = sm.get(name, 0) + x.sum(0)

        handles.append(lin.register_forward_hook(hook))
    idx, val = [], []
    try:
        for chunk in _batches(ids, batch):
            logits = model(input_ids=chunk).logits.to(torch.float32)
            top = torch.topk(logits, TOP_K_LOGITS, dim=-1)
            idx.append(top.indices)
            val.append(top.values)
            count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    stats = InputStats(
        norms={n: v.sqrt() for n, v in sq.items()},
        means={n: v / count for n, v in sm.items()},
    )
    return Reference(torch.cat(idx), torch.cat(val)), stats


@torch.no_grad()
def logit_mse(model: nn.Module, ids: torch.Tensor, ref: Reference, batch: int = 4) -> float:
    """MSE between the model's logits and the reference at the reference's top-k slots."""
    total, n = 0.0, 0
    for i, chunk in enumerate(_batches(ids, batch)):
        logits = model(input_ids=chunk).logits.to(torch.float32)
        sl = slice(i * batch, i * batch + chunk.shape[0])
        got = torch.gather(logits, -1, ref.index[sl])
        total += float(((got - ref.value[sl]) ** 2).sum())
        n += got.numel()
    return total / n


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, examples: list[Example], batch: int = 32) -> float:
    """Fraction of examples whose greedy generation (stripped) equals the answer."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    hits = 0
    for i in range(0, len(examples), batch):
        group = examples[i : i + batch]
        enc = tokenizer([e.prompt for e in group], return_tensors="pt", padding=True)
        longest = max(
            len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in group
        )
        out = model.generate(
            **enc,
            max_new_tokens=longest + 2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for e, row in zip(group, out[:, enc["input_ids"].shape[1] :], strict=True):
            hits += tokenizer.decode(row, skip_special_tokens=True).strip() == e.answer.strip()
    return hits / len(examples)
