"""One step, packed: the scheduler's plan -> a `StepInput` on the engine's device.

Tokens are grouped by variant: per variant its decode rows, then its prompt chunks,
so every variant's tokens are contiguous and its delta work is one item per group
(sparse.py). Logit rows: one per sequence that samples (a decode row, the last token of
a prompt), and for a sequence that scores its prompt (echo with logprobs) one per
prompt token that has a successor.

Everything the step's forward and sampling read is collected on the host and sent to
the device in one copy (transfer.py): ids, positions, KV slots, the decode and logit
rows, the delta items of the tokens and of the logit rows, the group of every token
and row, the sampling parameters. Only the per-group vector deltas are computed on the
device (a stack of the step's variants' vectors, one gather and one subtraction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.sampling import Row, SamplingBatch, ScoreRows
from server.engine.sequence import Sequence
from server.engine.sparse import Segment, StepDeltas, VariantLayout
from server.engine.transfer import Packer


@dataclass(frozen=True)
class Prefill:
    start: int  # first token in the packed step
    length: int  # tokens of this chunk
    slot: int
    position: int  # position of the chunk's first token


@dataclass
class StepInput:
    """One step on the device (host ints where a shape or a loop bound needs them)."""

    ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    slots: torch.Tensor  # (N,) int64 KV slot of each token
    decode_idx: torch.Tensor  # (B,) int64 packed index of each decode row
    decode_slots: torch.Tensor  # (B,) int64
    decode_lens: torch.Tensor  # (B,) int64 context length after this token
    max_decode_len: int  # the longest of decode_lens (host: it sizes the attention)
    prefills: list[Prefill]
    logits_idx: torch.Tensor  # (R,) int64 packed index of the rows that get logits
    deltas: StepDeltas  # over the N packed tokens
    head_deltas: StepDeltas  # over the R logit rows
    # 1-D deltas (norm weights, biases) per group: (G, V) fp32 over the runner's vector
    # slots, with the group of each packed token (N,) and of each logit row (R,)
    vectors: torch.Tensor | None = None
    token_group: torch.Tensor | None = None
    row_group: torch.Tensor | None = None
    sampling: dict[str, torch.Tensor] | None = None  # SamplingBatch.pack's fields


@dataclass(frozen=True)
class Group:
    """The tokens of one variant in a packed step."""

    variant: str | None
    start: int
    end: int
    row_start: int  # logit rows
    row_end: int


@dataclass(frozen=True)
class Scored:
    """A prompt chunk that scores the prompt's next tokens (echo), from `position`."""

    seq: Sequence
    position: int


@dataclass
class Batch:
    step: StepInput
    groups: list[Group]
    sampled: list[Sequence]  # the sequences of the sampling rows, in SamplingBatch order
    scored: list[Scored]  # in the order of the sampling batch's ScoreRows
    sampling: SamplingBatch


@dataclass(frozen=True)
class Packing:
    """What packing needs of the engine: the variants' layouts, the vocabulary, the
    size of the runner's vector slots, where the step runs, which ops it uses."""

    layout: Callable[[str], VariantLayout]
    vocab: int
    vector_size: int
    device: torch.device
    native: bool = True


def pack(
    decode: list[Sequence],
    chunks: list[tuple[Sequence, int]],
    merged: str | None,
    how: Packing,
) -> Batch:
    """The step of these decode rows and prompt chunks, with `merged` in the weights."""
    by_variant: dict[str | None, list[tuple[Sequence, int]]] = {}
    for s in decode:
        by_variant.setdefault(s.variant, []).append((s, 0))
    for s, n in chunks:
        by_variant.setdefault(s.variant, []).append((s, n))
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    dec_idx: list[int] = []
    dec_slots: list[int] = []
    dec_lens: list[int] = []
    logit_rows: list[int] = []
    prefills: list[Prefill] = []
    groups: list[Group] = []
    rows: list[Row] = []
    sampled: list[Sequence] = []
    scored: list[Scored] = []
    scores: list[ScoreRows] = []
    for variant, members in by_variant.items():
        g_start, g_row = len(ids), len(logit_rows)
        for s, chunk in members:
            n = len(ids)
            if chunk == 0:  # a decode row: its newest token
                ids.append(s.last_token)
                positions.append(s.length - 1)
                slots.append(s.slot)
                dec_idx.append(n)
                dec_slots.append(s.slot)
                dec_lens.append(s.length)
                rows.append(Row(len(logit_rows), s.sampling, s.ids, s.grammar))
                sampled.append(s)
                logit_rows.append(n)
                continue
            ids.extend(s.prompt[s.prefilled : s.prefilled + chunk])
            positions.extend(range(s.prefilled, s.prefilled + chunk))
            slots.extend([s.slot] * chunk)
            prefills.append(Prefill(n, chunk, s.slot, s.prefilled))
            ends = s.prefilled + chunk == len(s.prompt)
            if s.scores_prompt:  # every position with a next prompt token
                k = chunk - 1 if ends else chunk
                if k:
                    targets = s.prompt[s.prefilled + 1 : s.prefilled + 1 + k]
                    scored.append(Scored(s, s.prefilled))
                    scores.append(ScoreRows(len(logit_rows), targets, s.prompt_logprobs_k))
                    logit_rows.extend(range(n, n + k))
            if ends and s.samples:
                rows.append(Row(len(logit_rows), s.sampling, s.ids, s.grammar))
                sampled.append(s)
                logit_rows.append(n + chunk - 1)
        groups.append(Group(variant, g_start, len(ids), g_row, len(logit_rows)))

    p = Packer()
    p.ints("ids", ids)
    p.ints("positions", positions)
    p.ints("slots", slots)
    p.ints("decode_idx", dec_idx)
    p.ints("decode_slots", dec_slots)
    p.ints("decode_lens", dec_lens)
    p.ints("logits_idx", logit_rows)
    terms = [_terms(g.variant, merged, how.layout) for g in groups]
    segs = [
        Segment(g.start, g.end, lay, sign)
        for g, t in zip(groups, terms, strict=True)
        for lay, sign in t
    ]
    head = [
        Segment(g.row_start, g.row_end, lay, sign)
        for g, t in zip(groups, terms, strict=True)
        if g.row_end > g.row_start
        for lay, sign in t
    ]
    seg_variants = StepDeltas.pack(p, "d", segs)
    head_variants = StepDeltas.pack(p, "h", head)
    vec_layouts = _vector_terms(p, groups, terms)
    sampling = SamplingBatch(rows, scores, how.vocab)
    sampling.pack(p)
    f = p.send(how.device)
    step = StepInput(
        ids=f["ids"],
        positions=f["positions"],
        slots=f["slots"],
        decode_idx=f["decode_idx"],
        decode_slots=f["decode_slots"],
        decode_lens=f["decode_lens"],
        max_decode_len=max(dec_lens, default=0),
        prefills=prefills,
        logits_idx=f["logits_idx"],
        deltas=StepDeltas(seg_variants, f["d.bases"], f["d.items"], how.native),
        head_deltas=StepDeltas(head_variants, f["h.bases"], f["h.items"], how.native),
        sampling=f,
    )
    if vec_layouts:
        step.vectors = _group_vectors(vec_layouts, f, how)
        step.token_group, step.row_group = f["v.token_group"], f["v.row_group"]
    return Batch(step, groups, sampled, scored, sampling)


def _terms(
    variant: str | None, merged: str | None, layout: Callable[[str], VariantLayout]
) -> list[tuple[VariantLayout, float]]:
    """What a group's rows add to the resident weights: +their delta, -the merged one."""
    if variant == merged:
        return []
    terms = []
    if variant is not None:
        terms.append((layout(variant), 1.0))
    if merged is not None:
        terms.append((layout(merged), -1.0))
    return terms


def _vector_terms(
    p: Packer, groups: list[Group], terms: list[list[tuple[VariantLayout, float]]]
) -> list[VariantLayout]:
    """The step's variants with 1-D deltas, and per group (in `p`) the index of the one
    it adds and the one it takes out (len: none), and the group of every token and row."""
    have: list[VariantLayout] = []
    for t in terms:
        for lay, _ in t:
            if lay.vectors is not None and all(lay is not h for h in have):
                have.append(lay)
    if not have:
        return []
    index = {id(lay): i for i, lay in enumerate(have)}
    none = len(have)
    plus, minus = [], []
    for t in terms:
        plus.append(next((index[id(lay)] for lay, s in t if s > 0 and id(lay) in index), none))
        minus.append(next((index[id(lay)] for lay, s in t if s < 0 and id(lay) in index), none))
    p.ints("v.plus", plus)
    p.ints("v.minus", minus)
    p.ints("v.token_group", [i for i, g in enumerate(groups) for _ in range(g.end - g.start)])
    p.ints("v.row_group", [i for i, g in enumerate(groups) for _ in range(g.row_end - g.row_start)])
    return have


def _group_vectors(
    have: list[VariantLayout], f: dict[str, torch.Tensor], how: Packing
) -> torch.Tensor:
    """(G, V) fp32 on the device: each group's added vectors less the taken-out ones."""
    zero = torch.zeros(how.vector_size, dtype=torch.float32, device=how.device)
    stack = torch.stack([lay.vectors for lay in have if lay.vectors is not None] + [zero])
    return stack.index_select(0, f["v.plus"]) - stack.index_select(0, f["v.minus"])
