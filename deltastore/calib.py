"""Calibration: token batches, per-layer input statistics, and the fine-tuned model's
reference logits that the unlabelled q search tries to keep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn

TOP_K_LOGITS = 5  # the logit-MSE objective's slots (the paper's)
TOP_K_KL = 64  # the KL objective's: the fine-tune's mass outside them is negligible


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


class Objective(StrEnum):
    """What the unlabelled q search keeps close to the fine-tuned model, on the
    calibration tokens (lower is better for all three)."""

    LOGIT_MSE = "logit-mse"  # the DAREx paper's q_e: MSE of the fine-tune's top-5 logits
    # KL(fine-tune || candidate) summed over the fine-tune's top-64 tokens only: not a
    # divergence (a candidate sharper than the fine-tune on those tokens can score
    # below zero), but the form every KL row of the fidelity study measured; a tail
    # bucket for the mass outside them is the known refinement, to be measured first
    KL = "kl"
    HIDDEN = "hidden-mse"  # every layer's hidden state, MSE relative to its power


# KL: as good as the logit MSE on every ordinary fine-tune of the fidelity study, and
# far better on large deltas, where the logit MSE picks a q in the noise (97% of the
# gain against 0% at p = 0.999 on one; BENCHMARKS.md, "Large deltas").
DEFAULT_OBJECTIVE = Objective.KL


def parse_objective(value: str) -> Objective:
    try:
        return Objective(value)
    except ValueError:
        raise ValueError(
            f"unknown q objective {value!r}; choose from {', '.join(o.value for o in Objective)}"
        ) from None


@dataclass(frozen=True)
class Reference:
    """The fine-tuned model's outputs on the calibration tokens."""

    index: torch.Tensor  # (n, L, k) int64: the top-k token ids, best first
    value: torch.Tensor  # (n, L, k) fp32: their logits
    logz: torch.Tensor  # (n, L) fp32: log-sum-exp of all logits (for log-probabilities)
    # per layer (embeddings first, the final norm's output last): (n, L, d) bf16;
    # empty unless the hidden-state objective needs it
    hidden: tuple[torch.Tensor, ...] = ()


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
def collect(
    model: nn.Module, ids: torch.Tensor, batch: int = 4, hidden: bool = False
) -> tuple[Reference, InputStats]:
    """One pass of the (fine-tuned) model over the calibration tokens; `hidden` also
    keeps every layer's hidden state (for Objective.HIDDEN)."""
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
    idx, val, logz = [], [], []
    layers: list[list[torch.Tensor]] = []
    try:
        for chunk in _batches(ids, batch):
            out = model(input_ids=chunk, output_hidden_states=hidden)
            logits = out.logits.to(torch.float32)
            top = torch.topk(logits, min(TOP_K_KL, logits.shape[-1]), dim=-1)
            idx.append(top.indices)
            val.append(top.values)
            logz.append(torch.logsumexp(logits, dim=-1))
            if hidden:
                layers.append([h.to(torch.bfloat16) for h in out.hidden_states])
            count += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    stats = InputStats(
        norms={n: v.sqrt() for n, v in sq.items()},
        means={n: v / count for n, v in sm.items()},
    )
    per_layer = tuple(torch.cat(hs) for hs in zip(*layers, strict=True)) if layers else ()
    return Reference(torch.cat(idx), torch.cat(val), torch.cat(logz), per_layer), stats


@torch.no_grad()
def objectives(
    model: nn.Module,
    ids: torch.Tensor,
    ref: Reference,
    which: tuple[Objective, ...] = tuple(Objective),
    batch: int = 4,
) -> dict[Objective, float]:
    """The given objectives of `model` against the reference, from one forward pass
    over the calibration tokens (each a mean over tokens; lower is closer)."""
    want_hidden = Objective.HIDDEN in which
    if want_hidden and not ref.hidden:
        raise ValueError("the hidden-state objective needs a reference collected with hidden")
    mse = kl = 0.0
    n_mse = n_tok = 0
    err = [0.0] * len(ref.hidden)
    power = [0.0] * len(ref.hidden)
    for i, chunk in enumerate(_batches(ids, batch)):
        sl = slice(i * batch, i * batch + chunk.shape[0])
        out = model(input_ids=chunk, output_hidden_states=want_hidden)
        logits = out.logits.to(torch.float32)
        got = torch.gather(logits, -1, ref.index[sl])  # (b, L, k)
        k5 = min(TOP_K_LOGITS, got.shape[-1])
        mse += float(((got[..., :k5] - ref.value[sl, :, :k5]) ** 2).sum())
        n_mse += got[..., :k5].numel()
        if Objective.KL in which:
            log_ref = ref.value[sl] - ref.logz[sl, :, None]  # (b, L, k)
            p_ref = log_ref.exp()
            log_got = got - torch.logsumexp(logits, dim=-1, keepdim=True)
            kl += float((p_ref * (log_ref - log_got)).sum())
        n_tok += chunk.numel()
        if want_hidden:
            for j, (h, h_ref) in enumerate(zip(out.hidden_states, ref.hidden, strict=True)):
                h_ref32 = h_ref[sl].to(torch.float32)
                err[j] += float(((h.to(torch.float32) - h_ref32) ** 2).sum())
                power[j] += float((h_ref32**2).sum())
    values = {Objective.LOGIT_MSE: mse / n_mse, Objective.KL: kl / n_tok}
    if want_hidden:
        values[Objective.HIDDEN] = sum(e / p for e, p in zip(err, power, strict=True) if p) / len(
            err
        )
    return {o: values[o] for o in which}


def logit_mse(model: nn.Module, ids: torch.Tensor, ref: Reference, batch: int = 4) -> float:
    """MSE between the model's logits and the reference at the reference's top-5 slots."""
    return objectives(model, ids, ref, (Objective.LOGIT_MSE,), batch)[Objective.LOGIT_MSE]


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
