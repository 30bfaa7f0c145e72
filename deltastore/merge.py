"""Merge sparse deltas of one base into one delta: compositions of fine-tunes.

    merge([(delta_a, 0.7), (delta_b, 0.3)], MergeMethod.SUM) -> Delta

Methods (one dispatcher, shared by `deltaserve merge` and the server's compositions):
- `sum`: task arithmetic, Σ w_i·Δ_i.
- `ties` (Yadav et al., "TIES-Merging"): trim each member to the largest `density`
  of its kept entries by magnitude (1.0, the default, keeps them all: a pruned delta
  is already sparse), elect each entry's sign as the sign of Σ w_i·Δ_i, and average
  the members whose w_i·Δ_i agree with it: Σ_agree w_i·Δ_i / Σ_agree |w_i|.
- `dare-merge` (Yu et al., "Language Models are Super Mario"): re-drop each member's
  kept entries, keeping a `density` fraction (0.5 by default) with a generator seeded
  from (seed, member, tensor), rescale the kept ones by 1/density, then sum.

Exactness: every member's entries are taken as value·scale in fp32, and where
positions overlap, the merged entry is computed in fp32 over the members in name
order (not the order they were listed in), so a+b and b+a give the same bytes; a
member with weight 0 is left out; the result holds, with scale 1, the union of the
members' positions (entries that come out exactly 0 are dropped), its values
rounded once to the delta file's storage precision (bf16, fp32 where bf16 would
overflow): the server's compositions are exactly the file `deltaserve merge` writes.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch

from deltastore.format import Delta, DeltaMeta, TensorDelta, storage_values
from deltastore.methods import tensor_generator


class MergeMethod(StrEnum):
    SUM = "sum"
    TIES = "ties"
    DARE_MERGE = "dare-merge"


MAX_WEIGHT = 1e6
DEFAULT_DENSITY = {MergeMethod.SUM: 1.0, MergeMethod.TIES: 1.0, MergeMethod.DARE_MERGE: 0.5}


class MergeError(ValueError):
    pass


def merge(
    members: list[tuple[str, Delta, float]],
    method: MergeMethod = MergeMethod.SUM,
    density: float | None = None,
    seed: int = 0,
    source: str = "",
) -> Delta:
    """Merge (name, delta, weight) members of one base into one delta."""
    density = DEFAULT_DENSITY[method] if density is None else density
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    weights: dict[str, float] = {}
    deltas: dict[str, Delta] = {}
    for name, delta, w in members:  # a member named twice: its weights add up
        if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise MergeError(f"the weight of {name!r} must be finite, at most {MAX_WEIGHT:g}")
        if name in deltas and deltas[name] is not delta:
            raise MergeError(f"two different deltas are both named {name!r}")
        weights[name] = weights.get(name, 0.0) + float(w)
        deltas[name] = delta
    order = sorted(n for n in weights if weights[n] != 0.0)
    if not order:
        raise MergeError("a composition needs at least one member with a non-zero weight")
    bases = {deltas[n].meta.base_fingerprint for n in order}
    if len(bases) > 1:
        raise MergeError(f"members were made against different bases: {sorted(bases)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for n in order:
        for t in deltas[n].tensors.values():
            if shapes.setdefault(t.name, t.shape) != t.shape:
                raise MergeError(f"tensor {t.name}: shapes differ between members")
    tensors = {}
    for tname in sorted(shapes):
        parts = [
            (n, deltas[n].tensors[tname], weights[n]) for n in order if tname in deltas[n].tensors
        ]
        merged = _merge_tensor(tname, shapes[tname], parts, method, density, seed)
        if merged is not None:
            tensors[tname] = merged
    first = deltas[order[0]].meta
    numel = sum(t.numel for t in tensors.values()) or 1
    kept = sum(t.count for t in tensors.values() if not t.dense)
    sparse_numel = sum(t.numel for t in tensors.values() if not t.dense) or numel
    meta = DeltaMeta(
        base_fingerprint=first.base_fingerprint,
        base_numel=first.base_numel,
        method=f"merge:{method.value}",
        rate=min(max(1.0 - kept / sparse_numel, 0.0), 0.999999999),
        q=None,
        seed=seed,
        policy={
            "merge": {
                "method": method.value,
                "density": density,
                "members": [{"name": n, "weight": weights[n]} for n in order],
            }
        },
        source=source or "+".join(f"{weights[n]:g}*{n}" for n in order),
    )
    return Delta(meta, tensors)


def _entries(t: TensorDelta) -> tuple[torch.Tensor, torch.Tensor]:
    return t.positions, t.values.to(torch.float32) * t.scale


def _merge_tensor(
    name: str,
    shape: tuple[int, ...],
    parts: list[tuple[str, TensorDelta, float]],
    method: MergeMethod,
    density: float,
    seed: int,
) -> TensorDelta | None:
    dense = any(t.dense for _, t, _ in parts)
    pos_list, val_list, w_list = [], [], []
    for member, t, w in parts:
        pos, val = _entries(t)
        if method is MergeMethod.TIES and density < 1.0 and not t.dense:
            k = max(round(density * pos.numel()), 1) if pos.numel() else 0
            keep = torch.topk(val.abs(), k).indices.sort().values
            pos, val = pos[keep], val[keep]
        elif method is MergeMethod.DARE_MERGE and density < 1.0 and not t.dense:
            gen = tensor_generator(seed, f"{member}:{name}")
            keep = torch.rand(pos.numel(), generator=gen) < density
            pos, val = pos[keep], val[keep] / density
        pos_list.append(pos)
        val_list.append(val)
        w_list.append(torch.full_like(val, w))
    positions = torch.cat(pos_list)
    if positions.numel() == 0:
        return None
    values, weights = torch.cat(val_list), torch.cat(w_list)
    union, inverse = torch.unique(positions, sorted=True, return_inverse=True)
    if method is MergeMethod.TIES:
        weighted = values * weights  # a negative weight flips its member's sign
        elected = torch.zeros(union.numel()).index_add_(0, inverse, weighted).sign()
        agree = (weighted.sign() == elected[inverse]) & (weighted != 0)
        num = torch.zeros(union.numel()).index_add_(0, inverse, torch.where(agree, weighted, 0))
        den = torch.zeros(union.numel()).index_add_(
            0, inverse, torch.where(agree, weights.abs(), 0)
        )
        out = torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
    else:  # sum, and dare-merge after its re-drop
        out = torch.zeros(union.numel()).index_add_(0, inverse, values * weights)
    if dense:  # a dense member (norms, biases) keeps the tensor dense
        full = torch.zeros(int(torch.tensor(shape).prod()))
        full[union] = out
        return TensorDelta(name, shape, torch.arange(full.numel()), full, 1.0, dense=True)
    nonzero = out != 0
    if not bool(nonzero.any()):
        return None
    # as a delta file stores them: a served composition is the file `merge` writes
    return TensorDelta(name, shape, union[nonzero], storage_values(out[nonzero]), 1.0)
