"""Delta pruning: which entries of a tensor's delta are kept, and the default rescale.

Every method picks a mask; the rescale is a separate number (scale = 1/q), kept
exact in the file's metadata. "Rescale" here means multiply by exactly 1/q, not
mergekit's L1-norm matching.

- dare:       Bernoulli keep with prob 1-p, q = 1-p (Yu et al. 2023).
- darex-q:    the same mask, q > 1-p given or searched (Deng et al. 2024).
- magnitude:  top (1-p) of |delta| per tensor, q = 1 (no rescale) unless given.
- wanda:      top (1-p) per output row of |delta_ij| * ||X_j||_2, q = 1 unless given.
- structural: whole input columns dropped with prob p, q = 1-p unless given.
- mix:        the largest |delta| entries (a fraction `top` of the 1-p kept) stay
              as they are, and a Bernoulli sample of the rest fills the budget and
              is rescaled by 1/q, q = its keep probability unless given or searched.
              Large deltas carry much of their effect in few large entries, which a
              random drop at p = 0.999 almost surely loses; the sample keeps the
              bulk's mean. (An attempt beyond the DAREx paper: BENCHMARKS.md, "Fidelity".)
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import TypeVar

import torch

E = TypeVar("E", bound=StrEnum)


class Method(StrEnum):
    DARE = "dare"
    DAREX_Q = "darex-q"
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    STRUCTURAL = "structural"
    MIX = "mix"


def parse_choice(kind: type[E], value: str, what: str) -> E:
    """`kind(value)`, or a ValueError that names the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(
            f"unknown {what} {value!r}; choose one of {[c.value for c in kind]}"
        ) from None


def parse_method(value: str) -> Method:
    return parse_choice(Method, value, "method")


def check_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate (drop probability p) must be in [0, 1), got {rate}")
    return rate


def check_q(q: float) -> float:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1] (rescale = 1/q), got {q}")
    return q


MIX_TOP = 0.5  # mix: the share of the kept entries chosen by magnitude


def check_mix_top(top: float) -> float:
    if not 0.0 < top < 1.0:
        raise ValueError(f"mix top share must be in (0, 1), got {top}")
    return top


def mix_sample_rate(rate: float, top: float = MIX_TOP) -> float:
    """The keep probability of the mix's random part, for a tensor of n entries with
    round(top (1-p) n) kept by magnitude: ((1-p) - top (1-p)) / (1 - top (1-p))."""
    kept = 1.0 - rate
    return (kept - top * kept) / (1.0 - top * kept)


def default_q(method: Method, rate: float, mix_top: float = MIX_TOP) -> float:
    """The q a method uses when none is given (darex-q without --q means DARE's)."""
    if method in (Method.MAGNITUDE, Method.WANDA):
        return 1.0
    if method is Method.MIX:
        return mix_sample_rate(rate, mix_top)
    return 1.0 - rate


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name): masks do not depend on the
    order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def select(
    method: Method,
    delta: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    input_norms: torch.Tensor | None = None,
    mix_top: float = MIX_TOP,
) -> torch.Tensor:
    """Kept flat positions of `delta` (any shape), int64 (k,), strictly increasing.
    For mix, see `select_mix` (which also says which entries are the top ones)."""
    check_rate(rate)
    numel = delta.numel()
    if rate == 0.0:
        return torch.arange(numel, dtype=torch.int64)
    match method:
        case Method.MIX:
            return select_mix(delta, rate, generator, mix_top)[0]
        case Method.DARE | Method.DAREX_Q:
            return _bernoulli(numel, rate, generator)
        case Method.MAGNITUDE:
            return _top_k(delta.reshape(-1).abs(), round((1.0 - rate) * numel))
        case Method.WANDA:
            return _wanda(delta, rate, input_norms)
        case Method.STRUCTURAL:
            return _structural(delta, rate, generator)
    raise ValueError(f"unhandled method {method!r}")


def select_mix(
    delta: torch.Tensor, rate: float, generator: torch.Generator, top: float = MIX_TOP
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept positions, strictly increasing; bool (k,): True where kept by magnitude).
    The top round(top (1-p) n) entries by |delta|, and each other entry with the
    probability `mix_sample_rate(p, top)`."""
    check_rate(rate)
    check_mix_top(top)
    numel = delta.numel()
    flat = delta.reshape(-1)
    n_top = min(numel, round(top * (1.0 - rate) * numel))
    top_pos = _top_k(flat.abs(), n_top)
    # the draw covers every entry (the mask does not depend on the values beyond the
    # top set); entries of the top set are kept anyway
    drawn = torch.rand(numel, generator=generator, dtype=torch.float32) < mix_sample_rate(rate, top)
    is_top = torch.zeros(numel, dtype=torch.bool)
    is_top[top_pos] = True
    keep = (drawn | is_top).nonzero().reshape(-1)
    return keep, is_top[keep]


def _bernoulli(numel: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    # torch.rand in fp32: torch.bernoulli has no CPU fp16, and the mask must not
    # depend on the delta's dtype.
    keep = torch.rand(numel, generator=generator, dtype=torch.float32) >= rate
    return keep.nonzero().reshape(-1)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.topk(scores, k, sorted=False).indices.sort().values


def _wanda(delta: torch.Tensor, rate: float, input_norms: torch.Tensor | None) -> torch.Tensor:
    if delta.dim() != 2:
        return _top_k(delta.reshape(-1).abs(), round((1.0 - rate) * delta.numel()))
    rows, cols = delta.shape
    scores = delta.abs()
    if input_norms is not None:
        if input_norms.shape != (cols,):
            raise ValueError(f"input norms of shape {tuple(input_norms.shape)}, need ({cols},)")
        scores = scores * input_norms.to(scores.dtype)[None, :]
    k = round((1.0 - rate) * cols)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    cols_kept = torch.topk(scores, k, dim=1, sorted=False).indices  # (rows, k)
    flat = cols_kept + torch.arange(rows, dtype=torch.int64)[:, None] * cols
    return flat.reshape(-1).sort().values


def _structural(delta: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    if delta.dim() != 2:
        return _bernoulli(delta.numel(), rate, generator)
    rows, cols = delta.shape
    kept_cols = (torch.rand(cols, generator=generator) >= rate).nonzero().reshape(-1)
    flat = kept_cols[None, :] + torch.arange(rows, dtype=torch.int64)[:, None] * cols
    return flat.reshape(-1)
