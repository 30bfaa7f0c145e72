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
    """What the unlabelled q search keeps close to the fine-tuned model on the
    calibration text. Lower is better for all but `agreement` (`minimise`)."""

    LOGIT_MSE = "logit-mse"  # the DAREx paper's q_e: MSE of the fine-tune's top-5 logits
    # KL(fine-tune || candidate) over the fine-tune's top-64 tokens, plus one bucket for
    # the mass outside them, (1-P) log((1-P)/(1-Q)): a true divergence (>= 0)
    KL = "kl"
    HIDDEN = "hidden-mse"  # every layer's hidden state, MSE relative to its power
    # the KL at each position weighted by how far the fine-tune moved from the base
    # there (KL(fine-tune || base)): the positions it did not change do not dominate
    WEIGHTED_KL = "weighted-kl"
    # the KL on the fine-tune's own greedy replies to the calibration prompts (what it
    # will be asked to produce), teacher-forced
    GENERATED_KL = "generated-kl"
    # the share of those replies' tokens the candidate reproduces (teacher-forced)
    AGREEMENT = "agreement"

    @property
    def minimise(self) -> bool:
        return self is not Objective.AGREEMENT

    @property
    def needs_base(self) -> bool:
        """Needs the base's outputs on the calibration text (the positions' weights)."""
        return self is Objective.WEIGHTED_KL

    @property
    def on_continuations(self) -> bool:
        return self in (Objective.GENERATED_KL, Objective.AGREEMENT)


# The KL on the fine-tune's own greedy replies: over the q grid of the fidelity study's
# ordinary and large fine-tunes its pick lost 1% of the gain on average against the
# grid's best point, 6% at worst (BENCHMARKS.md, "Which q objective"); the KL over
# the whole calibration text lost 15% and 48%: it is minimised where the many
# positions the fine-tune did not change agree, not where its answers come back.
DEFAULT_OBJECTIVE = Objective.GENERATED_KL
# What the default becomes on a calibration text that holds no prompt in the chat
# format (nothing for the fine-tune to reply to): the KL over the text itself (the
# previous default: as good as the logit MSE on ordinary deltas, far better on large
# ones; BENCHMARKS.md, "Large deltas").
FALLBACK_OBJECTIVE = Objective.KL


def parse_objective(value: str) -> Objective:
    try:
        return Objective(value)
    except ValueError:
        raise ValueError(
            f"unknown q objective {value!r}; choose from {', '.join(o.value for o in Objective)}"
        ) from None


# The fine-tune's greedy replies to the first PROMPTS prompts of the calibration text
# (each cut after the chat template's generation header, at most PREFIX_TOKENS tokens
# of it kept), for up to CONTINUATION_TOKENS tokens or its end token.
PROMPTS = 32
PREFIX_TOKENS = 128
CONTINUATION_TOKENS = 32


def generation_header(tokenizer: Any) -> str:
    """The text the chat template puts before a reply (for SmolLM2 "<|im_start|>",
    "assistant" and a newline); "" without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    turn = [{"role": "user", "content": "x"}]
    reply = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    plain = tokenizer.apply_chat_template(turn, add_generation_prompt=False, tokenize=False)
    return str(reply[len(plain) :]) if str(reply).startswith(str(plain)) else ""


def load_prompts(path: Path, tokenizer: Any, n: int = PROMPTS) -> list[list[int]]:
    """The first n prompts of a calibration text written in the chat format: the text
    cut after each generation header (what the fine-tune replies to), each piece's
    leading whitespace stripped and at most its last PREFIX_TOKENS tokens kept. Empty
    without a chat template or when the text holds no header."""
    header = generation_header(tokenizer)
    if not header:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration file {path}: unreadable ({e})") from e
    pieces = text.split(header)[:-1][:n]
    ids = [tokenizer(p.lstrip() + header, add_special_tokens=False)["input_ids"] for p in pieces]
    return [x[-PREFIX_TOKENS:] for x in ids]


@dataclass(frozen=True)
class Continuations:
    """The fine-tune's greedy replies to the calibration prompts and its outputs on
    them (teacher-forced).

    Row i is the left-padded prompt (`prefix` columns), then its reply; the logits at
    columns prefix-1 .. prefix+G-2 predict the reply's G tokens."""

    ids: torch.Tensor  # (m, P+G) int64
    attention: torch.Tensor  # (m, P+G) int64: 1 on real tokens
    tokens: torch.Tensor  # (m, G) int64: the reply
    mask: torch.Tensor  # (m, G) bool: tokens up to and including the end token
    index: torch.Tensor  # (m, G, k) int64: the fine-tune's top-k tokens at each step
    value: torch.Tensor  # (m, G, k) fp32: their logits
    logz: torch.Tensor  # (m, G) fp32
    ft_agreement: tuple[float, float]  # the fine-tune's own (tokens, replies): ~1

    @property
    def prefix(self) -> int:
        return self.ids.shape[1] - self.tokens.shape[1]


@dataclass(frozen=True)
class Reference:
    """The fine-tuned model's outputs on the calibration tokens."""

    index: torch.Tensor  # (n, L, k) int64: the top-k token ids, best first
    value: torch.Tensor  # (n, L, k) fp32: their logits
    logz: torch.Tensor  # (n, L) fp32: log-sum-exp of all logits (for log-probabilities)
    # per layer (embeddings first, the final norm's output last): (n, L, d) bf16;
    # empty unless the hidden-state objective needs it
    hidden: tuple[torch.Tensor, ...] = ()
    # (n, L) fp32: KL(fine-tune || base) at each position; None without the base
    weights: torch.Tensor | None = None
    continuations: Continuations | None = None


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


def _eos_ids(model: nn.Module) -> list[int]:
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _logits(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor | None = None) -> Any:
    """The model's output on (b, L) ids; left padding (attention 0) shifts positions
    as generation does."""
    if attention is None:
        return model(input_ids=ids)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention, position_ids=positions)


@torch.no_grad()
def log_probs(model: nn.Module, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """(n, L, V) bf16: the model's next-token log-probabilities on the calibration ids
    (the base's: `collect` weighs positions and picks anchors by them)."""
    out = [
        torch.log_softmax(model(input_ids=chunk).logits.to(torch.float32), -1).to(torch.bfloat16)
        for chunk in _batches(ids, batch)
    ]
    return torch.cat(out)


def _top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top = torch.topk(logits, min(TOP_K_KL, logits.shape[-1]), dim=-1)
    return top.indices, top.values, torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def continuations(
    model: Any,
    prompts: list[list[int]],
    batch: int = 8,
    length: int = CONTINUATION_TOKENS,
) -> Continuations:
    """The model's greedy replies to the prompts (token ids), and its own outputs on
    them, teacher-forced."""
    if not prompts:
        raise ValueError("no prompt to reply to")
    eos = _eos_ids(model)
    pad = eos[0] if eos else 0
    prefix = max(len(p) for p in prompts)
    pre = torch.full((len(prompts), prefix), pad, dtype=torch.int64)
    attention = torch.zeros((len(prompts), prefix), dtype=torch.int64)
    for i, p in enumerate(prompts):
        pre[i, prefix - len(p) :] = torch.tensor(p, dtype=torch.int64)
        attention[i, prefix - len(p) :] = 1
    gen = []
    for i in range(0, len(prompts), batch):
        out = model.generate(
            input_ids=pre[i : i + batch],
            attention_mask=attention[i : i + batch],
            max_new_tokens=length,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )[:, prefix:]
        gen.append(torch.nn.functional.pad(out, (0, length - out.shape[1]), value=pad))
    tokens = torch.cat(gen)  # (m, G)
    if eos:
        ended = torch.isin(tokens, torch.tensor(eos)).to(torch.int64)
        mask = (ended.cumsum(1) - ended) == 0  # up to and including the first end token
    else:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    width = int(mask.sum(1).max())
    tokens, mask = tokens[:, :width], mask[:, :width]
    full = torch.cat([pre, tokens], 1)
    full_attention = torch.cat([attention, torch.ones_like(tokens)], 1)
    idx, val, logz = [], [], []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        logits = _logits(model, full[sl], full_attention[sl]).logits
        logits = logits[:, prefix - 1 : prefix - 1 + width].to(torch.float32)
        top = _top(logits)
        idx.append(top[0])
        val.append(top[1])
        logz.append(top[2])
    index = torch.cat(idx)
    hits = (index[..., 0] == tokens) & mask
    ft_tokens = float(hits.sum() / mask.sum())
    ft_sequences = float((hits | ~mask).all(1).to(torch.float32).mean())
    return Continuations(
        full,
        full_attention,
        tokens,
        mask,
        index,
        torch.cat(val),
        torch.cat(logz),
        (ft_tokens, ft_sequences),
    )


@torch.no_grad()
def collect(
    model: nn.Module,
    ids: torch.Tensor,
    batch: int = 4,
    hidden: bool = False,
    base: torch.Tensor | None = None,
    prompts: list[list[int]] | None = None,
) -> tuple[Reference, InputStats]:
    """One pass of the (fine-tuned) model over the calibration tokens; `hidden` also
    keeps every layer's hidden state (for Objective.HIDDEN). With the base's
    log-probabilities on the same ids (`log_probs`), each position is weighted by
    KL(fine-tune || base) there; with calibration prompts (`load_prompts`), the
    model's greedy replies to them are kept too (`continuations`)."""
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
    idx, val, logz, weights = [], [], [], []
    layers: list[list[torch.Tensor]] = []
    try:
        for i, chunk in enumerate(_batches(ids, batch)):
            out = model(input_ids=chunk, output_hidden_states=hidden)
            logits = out.logits.to(torch.float32)
            top = _top(logits)
            idx.append(top[0])
            val.append(top[1])
            logz.append(top[2])
            if base is not None:
                log_p = logits - top[2][..., None]
                log_q = base[i * batch : i * batch + chunk.shape[0]].to(torch.float32)
                weights.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0))
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
    w = torch.cat(weights) if weights else None
    cont = continuations(model, prompts) if prompts else None
    ref = Reference(torch.cat(idx), torch.cat(val), torch.cat(logz), per_layer, w, cont)
    return ref, stats


def _kl(
    log_ref: torch.Tensor, got: torch.Tensor, logz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (..., ): KL(reference || model) over the reference's top-k tokens,
    and the bucket of the mass outside them. log_ref (..., k): the reference's
    log-probabilities there; got (..., k): the model's logits there; logz (...,): the
    model's log-sum-exp."""
    log_got = got - logz[..., None]
    p_ref = log_ref.exp()
    top = (p_ref * (log_ref - log_got)).sum(-1)
    rest_ref = (1 - p_ref.sum(-1)).clamp(min=1e-12)
    rest_got = (1 - log_got.exp().sum(-1)).clamp(min=1e-12)
    return top, rest_ref * (rest_ref.log() - rest_got.log())


@torch.no_grad()
def measure(
    model: nn.Module,
    ids: torch.Tensor,
    ref: Reference,
    which: tuple[Objective, ...] = tuple(Objective),
    batch: int = 4,
) -> dict[str, float]:
    """The given objectives of `model` against the reference (each a mean over
    tokens), keyed by their value, from one forward pass over the calibration tokens
    and (for those on continuations) one over the continuations; also, when computed
    on the way: "kl-top" (the KL without the tail bucket), "sequence-agreement" (the
    share of continuations reproduced whole: what greedy decoding would give)."""
    want_hidden = Objective.HIDDEN in which
    if want_hidden and not ref.hidden:
        raise ValueError("the hidden-state objective needs a reference collected with hidden")
    if Objective.WEIGHTED_KL in which and ref.weights is None:
        raise ValueError("the weighted KL needs a reference collected with the base's outputs")
    cont = ref.continuations
    if any(o.on_continuations for o in which) and cont is None:
        needs = ", ".join(o.value for o in which if o.on_continuations)
        raise ValueError(
            f"{needs}: needs the fine-tune's replies to calibration prompts in the chat "
            "format (a text that holds the chat template's reply header after each prompt)"
        )
    out: dict[str, float] = {}
    if any(not o.on_continuations for o in which):
        out |= _on_calibration(model, ids, ref, want_hidden, batch)
    if cont is not None and any(o.on_continuations for o in which):
        out |= score_continuations(model, cont, 2 * batch).values(cont.mask)
    return out


def _on_calibration(
    model: nn.Module, ids: torch.Tensor, ref: Reference, want_hidden: bool, batch: int
) -> dict[str, float]:
    mse = kl_top = kl_tail = weighted = 0.0
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
        top, tail = _kl(ref.value[sl] - ref.logz[sl, :, None], got, torch.logsumexp(logits, dim=-1))
        kl_top += float(top.sum())
        kl_tail += float(tail.sum())
        if ref.weights is not None:
            weighted += float(((top + tail) * ref.weights[sl]).sum())
        n_tok += chunk.numel()
        if want_hidden:
            for j, (h, h_ref) in enumerate(zip(out.hidden_states, ref.hidden, strict=True)):
                h_ref32 = h_ref[sl].to(torch.float32)
                err[j] += float(((h.to(torch.float32) - h_ref32) ** 2).sum())
                power[j] += float((h_ref32**2).sum())
    values = {
        Objective.LOGIT_MSE.value: mse / n_mse,
        Objective.KL.value: (kl_top + kl_tail) / n_tok,
        "kl-top": kl_top / n_tok,
    }
    if ref.weights is not None:
        values[Objective.WEIGHTED_KL.value] = weighted / max(float(ref.weights.sum()), 1e-12)
    if want_hidden:
        values[Objective.HIDDEN.value] = sum(
            e / p for e, p in zip(err, power, strict=True) if p
        ) / len(err)
    return values


@dataclass(frozen=True)
class ContinuationScores:
    """A model's outputs on the fine-tune's continuations, per token (0 / False past
    each continuation's end)."""

    kl: torch.Tensor  # (m, G) fp32: KL(fine-tune || model) predicting each token
    hit: torch.Tensor  # (m, G) bool: the model's greedy token is the fine-tune's

    def values(self, mask: torch.Tensor) -> dict[str, float]:
        n = float(mask.sum())
        return {
            Objective.GENERATED_KL.value: float(self.kl.sum()) / n,
            Objective.AGREEMENT.value: float(self.hit.sum()) / n,
            "sequence-agreement": float((self.hit | ~mask).all(1).to(torch.float32).mean()),
        }


@torch.no_grad()
def score_continuations(
    model: nn.Module, cont: Continuations, batch: int = 8
) -> ContinuationScores:
    """The model teacher-forced on the fine-tune's continuations."""
    kl, hits = [], []
    width = cont.tokens.shape[1]
    for i in range(0, cont.ids.shape[0], batch):
        sl = slice(i, i + batch)
        logits = _logits(model, cont.ids[sl], cont.attention[sl]).logits
        logits = logits[:, cont.prefix - 1 : cont.prefix - 1 + width].to(torch.float32)
        got = torch.gather(logits, -1, cont.index[sl])
        top, tail = _kl(cont.value[sl] - cont.logz[sl, ..., None], got, torch.logsumexp(logits, -1))
        kl.append((top + tail) * cont.mask[sl])
        hits.append((logits.argmax(-1) == cont.tokens[sl]) & cont.mask[sl])
    return ContinuationScores(torch.cat(kl), torch.cat(hits))


def objectives(
    model: nn.Module,
    ids: torch.Tensor,
    ref: Reference,
    which: tuple[Objective, ...] = (Objective.LOGIT_MSE, Objective.KL, Objective.HIDDEN),
    batch: int = 4,
) -> dict[Objective, float]:
    """The given objectives of `model` against the reference (`measure`)."""
    values = measure(model, ids, ref, which, batch)
    return {o: values[o.value] for o in which}


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
