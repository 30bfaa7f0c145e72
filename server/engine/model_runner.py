"""One step's forward: packed tokens of many sequences and variants -> logits.

The runner computes the decoder directly from the resident parameters of the
transformers model, gpt-fast style, so that one step can serve tokens of many variants:

    tokens (N,) packed: each sequence's tokens contiguous, each variant's contiguous
    h = embed(ids) + row gather of each variant's embedding delta    (× √hidden: Gemma)
    per layer:  x = norm(h) with weight w + Δw_group(t)              (per-token vector deltas)
                y = x @ W.T + Σ_v sign_v · x[rows_v] @ Δ_v.T         (StepDeltas.spmm_add_)
                attention over the KV slots (decode rows batched, prefill per chunk)
    logits for the rows that sample: h @ E.T + each variant's lm_head/embedding delta

A model family is one row of `FAMILIES` (its norms, activation, fused products, rope and
attention quirks), never a copy of the forward: the one forward below reads the row.

    family       norms                        mlp   fused in checkpoint  rope, attention
    llama        w·x: in, post-attn           silu  -                    scaling (llama3...)
    mistral      w·x: in, post-attn           silu  -                    window on every layer
    qwen2        w·x: in, post-attn           silu  -                    q/k/v biases; window
                                                                          on sliding layers
    qwen3        w·x: in, post-attn, q/k      silu  -                    window on sliding layers
    gemma2       (1+w)·x: in, post-attn,      gelu  -                    ×√hidden, softcaps,
                 pre/post-ff                                              sliding/global layers
    gemma3_text  (1+w)·x: as gemma2, q/k      gelu  -                    local rope base on
                                                                          sliding layers
    phi3         w·x: in, post-attn           silu  qkv_proj,            partial rotary;
                                                    gate_up_proj         window on every layer

q/k/v and gate/up run as one GEMM each (and one sparse call each): fused in the
checkpoint (Phi-3: a delta names the fused tensor), or through a view of separate weights
that FlatWeights lays out one after another (fewer, larger products are what a
small-batch step on a CPU needs: BENCHMARKS.md, engine v2).

The weights are read from the model's modules at every step, so a variant merged in
place (apply_delta_) or materialized (parameter storage rebound) by the Engine is
what the dense GEMMs see; `StepDeltas` then carries the other variants' deltas, with
the merged one subtracted for rows that are not its own.

On a CPU with AVX512-BF16 and bf16 weights, the dense products of a few rows and the
decode rows' attention run by the engine's own kernels (`linear` and `attend`, from
kernels.decode_kernels); elsewhere they are F.linear and SDPA.

Device-independent: every tensor of a step lives on the engine's device, the sparse
products are the ops of server/engine/kernels (one implementation per device), and
nothing in the forward reads a device value on the host (shapes and loop bounds come
from the host side of the StepInput), so a step costs no host synchronization. Rope is
a table per position built once (so a step needs no frequency update: longrope uses
the long factors from its original context length on).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F

from server.engine.batch import StepInput
from server.engine.kernels import ATTEND_MAX_GROUP, ATTEND_MAX_HEAD_DIM, Attend, Linear
from server.engine.kv_cache import KVCache


class UnsupportedModel(ValueError):
    pass


# a step's attention masks by layer window (ModelRunner._masks), built on first use
Masks = dict[int | None, list[torch.Tensor]]


class Norm(StrEnum):
    """How an RMSNorm applies its weight (the normalization is fp32 in both)."""

    SCALE = "w·x"  # weight * x.to(dtype)             (LlamaRMSNorm)
    ONE_PLUS = "(1+w)·x"  # (x * (1 + weight)).to(dtype)   (Gemma)


class Window(StrEnum):
    """Which layers attend within `config.sliding_window` positions."""

    NONE = "none"
    EVERY_LAYER = "every layer"
    LAYER_TYPES = "layer_types"  # the layers config.layer_types names sliding_attention


SEPARATE_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SEPARATE_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# a layer's norms by role: attn_in, attn_out (on the attention's output), mlp_in,
# mlp_out (on the MLP's output), q and k (per head, before rope)
PRE_NORMS = (("attn_in", "input_layernorm"), ("mlp_in", "post_attention_layernorm"))
SANDWICH_NORMS = (
    ("attn_in", "input_layernorm"),
    ("attn_out", "post_attention_layernorm"),
    ("mlp_in", "pre_feedforward_layernorm"),
    ("mlp_out", "post_feedforward_layernorm"),
)
QK_NORMS = (("q", "self_attn.q_norm"), ("k", "self_attn.k_norm"))


@dataclass(frozen=True)
class Family:
    """A decoder family: what differs from Llama, as data."""

    norms: tuple[tuple[str, str], ...] = PRE_NORMS  # (role, module path in a layer)
    norm: Norm = Norm.SCALE
    qkv: tuple[str, ...] = SEPARATE_QKV  # one module: q/k/v fused in the checkpoint
    gate_up: tuple[str, ...] = SEPARATE_GATE_UP  # one module: gate/up fused
    act: str = "hidden_act"  # the config field naming the MLP's gate activation
    window: Window = Window.NONE
    embed_scale: bool = False  # embeddings × √hidden (rounded to the weights' dtype)
    query_scale: str | None = None  # config field s: logits scaled by s^-1/2, not head_dim^-1/2
    attn_softcap: bool = False  # attention logits soft-capped by attn_logit_softcapping
    final_softcap: bool = False  # final logits soft-capped by final_logit_softcapping
    rope_by_layer_type: bool = False  # one rope per layer type (a local base)


_GEMMA = Family(
    norms=SANDWICH_NORMS,
    norm=Norm.ONE_PLUS,
    act="hidden_activation",
    window=Window.LAYER_TYPES,
    embed_scale=True,
    query_scale="query_pre_attn_scalar",
    final_softcap=True,
)
# model_type -> family; a model whose type is not here is refused at startup
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(window=Window.EVERY_LAYER),
    "qwen2": Family(window=Window.LAYER_TYPES),
    "qwen3": Family(norms=PRE_NORMS + QK_NORMS, window=Window.LAYER_TYPES),
    "gemma2": replace(_GEMMA, attn_softcap=True),
    "gemma3_text": replace(_GEMMA, norms=SANDWICH_NORMS + QK_NORMS, rope_by_layer_type=True),
    "phi3": Family(
        qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",), window=Window.EVERY_LAYER
    ),
}
SUPPORTED = tuple(FAMILIES)
_LAYER_TYPES = ("full_attention", "sliding_attention")


def family_of(config: Any) -> Family:
    """The family of a model config; UnsupportedModel names the supported ones."""
    kind = getattr(config, "model_type", None)
    family = FAMILIES.get(kind or "")
    if family is None:
        raise UnsupportedModel(
            f"model type {kind!r} is not served; supported model types: {', '.join(SUPPORTED)}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(f"{kind} with bidirectional attention is not a causal decoder")
    if family.window is Window.LAYER_TYPES:
        odd = sorted(set(getattr(config, "layer_types", None) or ()) - set(_LAYER_TYPES))
        if odd:
            raise UnsupportedModel(f"{kind}: layer types {odd} (served: {list(_LAYER_TYPES)})")
    return family


@dataclass
class Product:
    """One product of a layer: a matrix, or matrices stacked by rows (q/k/v, gate/up)
    run as one GEMM through a view of their adjacent weights (`stacked`). The view is
    used only while every member's weight still lives where it was made from (a
    materialized variant rebinds them elsewhere)."""

    slot: int
    name: str  # the slot's name: a parameter's, or the group's (...qkv_proj)
    mods: list[Any]
    sizes: list[int]  # output rows per member
    biases: list[str | None]  # the members' bias parameter names
    stacked: torch.Tensor | None = None
    places: tuple[tuple[int, int], ...] = ()

    def weights_in_place(self) -> bool:
        return all(_place(m.weight) == p for m, p in zip(self.mods, self.places, strict=True))


@dataclass(frozen=True)
class LayerAttention:
    """What a layer's attention reads besides its weights."""

    window: int | None  # attend to the last `window` positions only
    rope: str  # the rope table it uses


def _place(t: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data is: its storage and its offset in it (data_ptr would do on
    real tensors; fake ones, which trace the step on a machine without the device, have
    storages but no addresses)."""
    return int(t.untyped_storage()._cdata), int(t.storage_offset())


def _stack(mods: list[Any]) -> tuple[torch.Tensor | None, tuple[tuple[int, int], ...]]:
    """A (sum of rows, in) view over adjacent, bias-free, contiguous weights, else None."""
    ws = [m.weight for m in mods]
    places = tuple(_place(w) for w in ws)
    if len(ws) < 2 or any(getattr(m, "bias", None) is not None for m in mods):
        return None, places
    first = ws[0]
    for (a, pa), (b, pb) in itertools.pairwise(zip(ws, places, strict=True)):
        adjacent = pb[0] == pa[0] and pb[1] == pa[1] + a.numel()
        if not (a.is_contiguous() and b.is_contiguous() and adjacent):
            return None, places
        if b.dtype != first.dtype or b.shape[1] != first.shape[1]:
            return None, places
    rows = sum(w.shape[0] for w in ws)
    view = torch.as_strided(first.detach(), (rows, first.shape[1]), (first.shape[1], 1))
    return view, places


def _activation(cfg: Any, family: Family) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    name = getattr(cfg, family.act, None)
    if name not in ACT2FN:
        raise UnsupportedModel(f"{cfg.model_type}: activation {family.act}={name!r} is unknown")
    fn: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[name]
    return fn


def _windows(cfg: Any, family: Family) -> list[int | None]:
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if family.window is Window.NONE or not window:
        return [None] * n
    if family.window is Window.EVERY_LAYER:
        return [int(window)] * n
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    return [int(window) if t == "sliding_attention" else None for t in types]


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class ModelRunner:
    def __init__(
        self, model: Any, kv: KVCache, linear: Linear = F.linear, attend: Attend | None = None
    ) -> None:
        """`linear` computes the dense products and `attend` (if given) the decode rows'
        attention: kernels.decode_kernels' choice for the device."""
        cfg = model.config
        self.linear = linear
        self.family = family = family_of(cfg)
        self.model, self.kv = model, kv
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.act = _activation(cfg, family)
        scaled_by = getattr(cfg, family.query_scale) if family.query_scale else self.head_dim
        self.scale = float(scaled_by) ** -0.5  # attention logits: q·k times this
        self.attn_cap = (
            getattr(cfg, "attn_logit_softcapping", None) if family.attn_softcap else None
        )
        self.final_cap = (
            getattr(cfg, "final_logit_softcapping", None) if family.final_softcap else None
        )
        takes = self.head_dim <= ATTEND_MAX_HEAD_DIM and (
            self.n_heads // self.n_kv <= ATTEND_MAX_GROUP
        )  # soft-capped logits: SDPA's path computes them
        self.attend = attend if takes and self.attn_cap is None else None
        self.layers = list(model.model.layers)
        self.embed = model.model.embed_tokens
        self.embed_scale = (
            float(torch.tensor(cfg.hidden_size**0.5).to(self.embed.weight.dtype))
            if family.embed_scale
            else None
        )
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.attn = [
            LayerAttention(w, t if family.rope_by_layer_type else "")
            for w, t in zip(_windows(cfg, family), types, strict=True)
        ]
        self.rope = self._rope_tables(model, {a.rope for a in self.attn}, kv.max_len)
        self.qkv_splits = [self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2
        self.gate_up_splits = [cfg.intermediate_size] * 2
        names = {id(p): n for n, p in model.named_parameters()}
        self.embed_name = names[id(self.embed.weight)]
        self.head_name = names[id(self.lm_head.weight)]  # the embedding's name when tied
        self.matrix_names: list[str] = [self.embed_name]
        if self.head_name != self.embed_name:
            self.matrix_names.append(self.head_name)
        self.fused: dict[str, list[tuple[str, int]]] = {}  # slot -> stacked (name, rows)
        groups = (
            ("self_attn.qkv_proj", family.qkv),
            ("self_attn.o_proj", ("self_attn.o_proj",)),
            ("mlp.gate_up_proj", family.gate_up),
            ("mlp.down_proj", ("mlp.down_proj",)),
        )
        prefixes = {id(m): n for n, m in model.named_modules()}
        # per layer: role (qkv, o, gate_up, down) -> its products
        self._products: list[dict[str, list[Product]]] = []
        for layer in self.layers:
            products: dict[str, list[Product]] = {}
            for (group, paths), role in zip(groups, ("qkv", "o", "gate_up", "down"), strict=True):
                products[role] = self._layer_products(layer, group, paths, names, prefixes)
            self._products.append(products)
        self._check_splits()
        self.slot_of = {n: i for i, n in enumerate(self.matrix_names)}
        # per layer: role -> (norm module, its weight's name)
        self._norms: list[dict[str, tuple[Any, str]]] = []
        for layer in self.layers:
            found = {}
            for role, path in family.norms:
                mod = layer.get_submodule(path)
                found[role] = (mod, names[id(mod.weight)])
            self._norms.append(found)
        self.final_norm_name = names[id(self.norm.weight)]
        # the 1-D tensors a step applies per row (norm weights, biases): name -> (offset,
        # size) in a variant's vector (sparse.py)
        self.vector_slots: dict[str, tuple[int, int]] = {}
        vector_params = [n for norms in self._norms for _, n in norms.values()]
        vector_params.append(self.final_norm_name)
        vector_params += [
            b
            for ps in self._products
            for group in ps.values()
            for p in group
            for b in p.biases
            if b
        ]
        params = dict(model.named_parameters())
        size = 0
        for n in vector_params:
            self.vector_slots[n] = (size, params[n].numel())
            size += params[n].numel()
        self.vector_size = size

    def _layer_products(
        self,
        layer: Any,
        group: str,
        paths: tuple[str, ...],
        names: dict[int, str],
        prefixes: dict[int, str],
    ) -> list[Product]:
        """One product for the group (fused in the checkpoint, or a stacked view), else
        one per matrix; each gets its slot in matrix_names."""
        mods = [layer.get_submodule(p) for p in paths]
        members = [names[id(m.weight)] for m in mods]
        biases = [names[id(m.bias)] if getattr(m, "bias", None) is not None else None for m in mods]
        sizes = [m.weight.shape[0] for m in mods]
        stacked, places = _stack(mods)
        if stacked is None:
            out = []
            for m, member, size, bias in zip(mods, members, sizes, biases, strict=True):
                out.append(Product(len(self.matrix_names), member, [m], [size], [bias]))
                self.matrix_names.append(member)
            return out
        name = f"{prefixes[id(layer)]}.{group}"
        self.fused[name] = list(zip(members, sizes, strict=True))
        self.matrix_names.append(name)
        return [Product(len(self.matrix_names) - 1, name, mods, sizes, biases, stacked, places)]

    def _check_splits(self) -> None:
        for role, splits in (("qkv", self.qkv_splits), ("gate_up", self.gate_up_splits)):
            rows = sum(s for p in self._products[0][role] for s in p.sizes)
            if rows != sum(splits):
                raise UnsupportedModel(
                    f"{self.model.config.model_type}: {role} has {rows} output rows, the config "
                    f"says {splits}"
                )

    def _rope_tables(
        self, model: Any, kinds: set[str], max_len: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin (max_len, rotary dim) per rope kind ("" or a layer type), by the
        model's own rotary module, once."""
        rotary = model.model.rotary_emb
        w = self.embed.weight
        like = torch.empty(0, dtype=w.dtype, device=w.device)  # the tables' dtype and device
        tables = {}
        for kind in sorted(kinds):
            rope_type = rotary.rope_type[kind] if kind else rotary.rope_type
            params = model.config.rope_parameters
            params = params[kind] if kind else params
            if "dynamic" in rope_type:
                raise UnsupportedModel(
                    f"rope type {rope_type!r} rescales with the batch's length; not served"
                )
            cuts = [0, max_len]
            if rope_type == "longrope":  # short factors within the original context
                cuts.insert(1, min(int(params["original_max_position_embeddings"]), max_len))
            parts = []
            for lo, hi in itertools.pairwise(cuts):
                if hi > lo:
                    pos = torch.arange(lo, hi, device=like.device)[None]
                    cs = rotary(like, pos, kind) if kind else rotary(like, pos)
                    parts.append(cs)
            if len(parts) > 1:  # longrope keeps the last call's factors: the short ones back
                first = torch.arange(1, device=like.device)[None]
                _ = rotary(like, first, kind) if kind else rotary(like, first)
            tables[kind] = (
                torch.cat([c[0] for c, _ in parts]),
                torch.cat([s[0] for _, s in parts]),
            )
        return tables

    def vector(self, step: StepInput, name: str) -> torch.Tensor | None:
        """(G, n) fp32: the step's per-group delta of the 1-D tensor `name`, or None."""
        if step.vectors is None:
            return None
        offset, size = self.vector_slots[name]
        return step.vectors[:, offset : offset + size]

    # ------------------------------------------------------------------ pieces

    def _rmsnorm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        dv: torch.Tensor | None,
        group: torch.Tensor | None,
    ) -> torch.Tensor:
        """As transformers' RMSNorm of the family over x's last dimension (x: (N, n) or
        (N, heads, n)); with dv (G, n), token t uses weight + dv[group[t]] (rounded to
        the weight's dtype, as a materialized fine-tune would hold it)."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = weight
        if dv is not None and group is not None:
            w = (weight.to(torch.float32) + dv).to(weight.dtype).index_select(0, group)
            if x.dim() == 3:
                w = w.unsqueeze(1)
        if self.family.norm is Norm.ONE_PLUS:
            return (h * (1.0 + w.to(torch.float32))).to(x.dtype)
        return w * h.to(x.dtype)

    def _norm(self, x: torch.Tensor, layer: int, role: str, step: StepInput) -> torch.Tensor:
        """x through the layer's `role` norm; x itself when the family has none there."""
        found = self._norms[layer].get(role)
        if found is None:
            return x
        mod, name = found
        return self._rmsnorm(x, mod.weight, self.vector(step, name), step.token_group)

    def _project(self, x: torch.Tensor, p: Product, step: StepInput) -> torch.Tensor:
        """x (N, in) -> (N, rows of p): the resident weights' GEMM plus the step's sparse
        deltas over their rows."""
        if p.stacked is not None and p.weights_in_place():
            y = self.linear(x, p.stacked, None)
        elif len(p.mods) == 1:
            y = self.linear(x, p.mods[0].weight, p.mods[0].bias)
        else:  # a materialized variant rebound the weights: stack the outputs instead
            y = torch.cat([self.linear(x, m.weight, m.bias) for m in p.mods], dim=1)
        step.deltas.spmm_add_(y, x, p.slot)
        if step.vectors is not None and step.token_group is not None:
            start = 0
            for size, bias in zip(p.sizes, p.biases, strict=True):
                dv = self.vector(step, bias) if bias is not None else None
                if dv is not None:
                    y[:, start : start + size] += dv.index_select(0, step.token_group).to(y.dtype)
                start += size
        return y

    def _group(
        self, x: torch.Tensor, layer: int, role: str, splits: list[int], step: StepInput
    ) -> list[torch.Tensor]:
        """The outputs of a group (q/k/v, gate/up), one per split: one product's output
        split, or one output per product."""
        ys = [self._project(x, p, step) for p in self._products[layer][role]]
        return list(ys[0].split(splits, dim=1)) if len(ys) == 1 else ys

    def _qkv(
        self, x: torch.Tensor, layer: int, step: StepInput, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, H, D), k and v (N, Hkv, D) of a layer, q and k normed (if the family
        norms them) and rotated. Without q/k norms, q and k are adjacent columns of one
        product's output and are rotated as one (N, H + Hkv, D) tensor: half the ops."""
        n, d, h = x.shape[0], self.head_dim, self.n_heads
        products = self._products[layer]["qkv"]
        if len(products) == 1 and "q" not in self._norms[layer]:
            y = self._project(x, products[0], step)
            qk = self._rotate(y[:, : (h + self.n_kv) * d].view(n, h + self.n_kv, d), cos, sin)
            v = y[:, (h + self.n_kv) * d :].view(n, self.n_kv, d)
            return qk[:, :h], qk[:, h:], v
        q, k, v = self._group(x, layer, "qkv", self.qkv_splits, step)
        q = self._norm(q.reshape(n, h, d), layer, "q", step)
        k = self._norm(k.reshape(n, self.n_kv, d), layer, "k", step)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v.reshape(n, self.n_kv, d)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rope over the first cos.shape[-1] dimensions of each head (all of them unless
        the rotary is partial); x (N, H, D), cos/sin (N, 1, R)."""
        r = cos.shape[-1]
        rot = x[..., :r]
        half = r // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Attention with the family's scale; soft-capped logits are computed as
        transformers' eager attention does (SDPA has no soft-capping)."""
        if self.attn_cap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scale)
        scores = _softcap(torch.matmul(q, k.transpose(-1, -2)) * self.scale, self.attn_cap)
        scores = torch.where(keep, scores, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

    def _masks(self, step: StepInput, window: int | None) -> list[torch.Tensor]:
        """The step's attention masks for layers of `window`: the decode rows' (B, 1, 1,
        L) if any (and SDPA attends for them), then each prefill chunk's (heads per kv
        head * T, ctx); the same for every such layer, so built once a step (`Masks`)."""
        device = step.ids.device
        g = self.n_heads // self.n_kv
        masks = []
        if step.decode_idx.numel() and self.attend is None:
            at = torch.arange(step.max_decode_len, device=device)[None]
            keep = at < step.decode_lens[:, None]
            if window is not None:  # positions within the window of the row's token
                keep = torch.logical_and(keep, at >= step.decode_lens[:, None] - window)
            masks.append(keep[:, None, None, :])
        for p in step.prefills:
            ctx = p.position + p.length
            pos = torch.arange(p.position, ctx, device=device)[:, None]
            at = torch.arange(ctx, device=device)[None]
            keep = at <= pos  # (T, ctx) causal
            if window is not None:
                keep = torch.logical_and(keep, at > pos - window)
            masks.append(keep.repeat(g, 1))
        return masks

    def _attention(
        self, layer: int, q: torch.Tensor, step: StepInput, masks: Masks
    ) -> torch.Tensor:
        """q (N, H, D) -> (N, H*D), reading keys/values from the KV slots."""
        n, hkv, d = q.shape[0], self.n_kv, self.head_dim
        g = self.n_heads // hkv
        window = self.attn[layer].window
        if window not in masks:
            masks[window] = self._masks(step, window)
        keeps = iter(masks[window])
        out = torch.empty((n, self.n_heads * d), dtype=q.dtype, device=q.device)
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        b = int(step.decode_idx.numel())
        if b and self.attend is not None:
            self.attend(
                out, q, kc, vc, step.decode_idx, step.decode_slots, step.decode_lens,
                window, self.scale,
            )  # fmt: skip
        elif b:
            length = step.max_decode_len
            qd = q.index_select(0, step.decode_idx).view(b, hkv, g, d)
            kd = kc[step.decode_slots, :, :length]  # (B, Hkv, L, D)
            vd = vc[step.decode_slots, :, :length]
            od = self._sdpa(qd, kd, vd, next(keeps))
            out[step.decode_idx] = od.reshape(b, self.n_heads * d)
        for p in step.prefills:
            t, ctx = p.length, p.position + p.length
            qp = q[p.start : p.start + t].view(t, hkv, g, d).permute(1, 2, 0, 3)
            qp = qp.reshape(1, hkv, g * t, d)
            kp, vp = kc[p.slot, :, :ctx].unsqueeze(0), vc[p.slot, :, :ctx].unsqueeze(0)
            op = self._sdpa(qp, kp, vp, next(keeps))
            op = op.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, self.n_heads * d)
            out[p.start : p.start + t] = op
        return out

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits (R, vocab) in fp32 for the rows in step.logits_idx."""
        h = F.embedding(step.ids, self.embed.weight)
        step.deltas.rowgather_add_(h, step.ids, self.slot_of[self.embed_name])
        if self.embed_scale is not None:
            h = h * self.embed_scale
        rope = {
            kind: (
                cos.index_select(0, step.positions)[:, None],
                sin.index_select(0, step.positions)[:, None],
            )
            for kind, (cos, sin) in self.rope.items()
        }  # (N, 1, R) each
        masks: Masks = {}
        for i in range(len(self.layers)):
            x = self._norm(h, i, "attn_in", step)
            cos, sin = rope[self.attn[i].rope]
            q, k, v = self._qkv(x, i, step, cos, sin)
            self.kv.write_(i, step.slots, step.positions, k, v)
            (o_proj,) = self._products[i]["o"]
            a = self._project(self._attention(i, q, step, masks), o_proj, step)
            h = h + self._norm(a, i, "attn_out", step)
            x = self._norm(h, i, "mlp_in", step)
            gate, up = self._group(x, i, "gate_up", self.gate_up_splits, step)
            (down,) = self._products[i]["down"]
            m = self._project(self.act(gate) * up, down, step)
            h = h + self._norm(m, i, "mlp_out", step)
        last = h.index_select(0, step.logits_idx)
        final = self.vector(step, self.final_norm_name)
        last = self._rmsnorm(last, self.norm.weight, final, step.row_group)
        logits = self.linear(last, self.lm_head.weight, None)
        step.head_deltas.spmm_add_(logits, last, self.slot_of[self.head_name])
        if self.final_cap is not None:
            logits = _softcap(logits, self.final_cap)
        return logits.float()
