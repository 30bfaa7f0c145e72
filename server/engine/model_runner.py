"""One step's forward: packed tokens of many sequences and variants -> logits.

The runner computes a Llama-family decoder (LlamaForCausalLM and the models that
share its layout) directly from the resident parameters of the transformers model,
gpt-fast style, so that one step can serve tokens of many variants:

    tokens (N,) packed: each sequence's tokens contiguous, each variant's contiguous
    h = embed(ids) + row gather of each variant's embedding delta
    per layer:  x = rmsnorm(h) * (w + Δw_group(t))            (per-token vector deltas)
                y = x @ W.T + Σ_v sign_v · x[rows_v] @ Δ_v.T   (StepDeltas.spmm_add_)
                attention over the KV slots (decode rows batched, prefill per chunk)
    logits for the rows that sample: h @ E.T + each variant's lm_head/embedding delta

q/k/v and gate/up run as one GEMM each (and one sparse call each) through a view of
their weights, which FlatWeights lays out one after another: fewer, larger products
are what a small-batch step on a CPU needs (BENCHMARKS.md, engine v2).

The weights are read from the model's modules at every step, so a variant merged in
place (apply_delta_) or materialized (parameter storage rebound) by the Engine is
what the dense GEMMs see; `StepDeltas` then carries the other variants' deltas, with
the merged one subtracted for rows that are not its own.

Device-independent: every tensor of a step lives on the engine's device, the sparse
products are the ops of server/engine/kernels (one implementation per device), and
nothing in the forward reads a device value on the host (shapes and loop bounds come
from the host side of the StepInput), so a step costs no host synchronization.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from server.engine.batch import StepInput
from server.engine.kv_cache import KVCache

SUPPORTED = {"llama", "mistral", "qwen2"}  # same decoder layout; no sliding window used
# a layer's products, in order; the members of a group run as one GEMM when their
# weights lie one after another in memory (FlatWeights puts them so, without biases)
PRODUCTS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


class UnsupportedModel(ValueError):
    pass


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


def check_supported(model: Any) -> None:
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise UnsupportedModel(f"mixed-variant steps support {sorted(SUPPORTED)}, not {kind!r}")
    window = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    if window and kind != "llama":
        raise UnsupportedModel(f"{kind} with a sliding window is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {cfg.hidden_act!r} is not supported (silu only)")


class ModelRunner:
    def __init__(self, model: Any, kv: KVCache) -> None:
        check_supported(model)
        self.model, self.kv = model, kv
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.layers = list(model.model.layers)
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        names = {id(p): n for n, p in model.named_parameters()}
        self.embed_name = names[id(self.embed.weight)]
        self.head_name = names[id(self.lm_head.weight)]  # the embedding's name when tied
        self.matrix_names: list[str] = [self.embed_name]
        if self.head_name != self.embed_name:
            self.matrix_names.append(self.head_name)
        self.fused: dict[str, list[tuple[str, int]]] = {}  # slot -> stacked (name, rows)
        self._products: list[list[Product]] = []
        prefixes = {id(m): n for n, m in model.named_modules()}
        for layer in self.layers:
            products = []
            for group, paths in PRODUCTS:
                mods = [layer.get_submodule(p) for p in paths]
                members = [names[id(m.weight)] for m in mods]
                biases = [
                    names[id(m.bias)] if getattr(m, "bias", None) is not None else None
                    for m in mods
                ]
                sizes = [m.weight.shape[0] for m in mods]
                stacked, places = _stack(mods)
                if stacked is None:  # one product per matrix
                    for m, member, size, bias in zip(mods, members, sizes, biases, strict=True):
                        products.append(
                            Product(len(self.matrix_names), member, [m], [size], [bias])
                        )
                        self.matrix_names.append(member)
                    continue
                name = f"{prefixes[id(layer)]}.{group}"
                self.fused[name] = list(zip(members, sizes, strict=True))
                products.append(
                    Product(len(self.matrix_names), name, mods, sizes, biases, stacked, places)
                )
                self.matrix_names.append(name)
            self._products.append(products)
        self.slot_of = {n: i for i, n in enumerate(self.matrix_names)}
        self._norms = [
            (names[id(la.input_layernorm.weight)], names[id(la.post_attention_layernorm.weight)])
            for la in self.layers
        ]
        self.final_norm_name = names[id(self.norm.weight)]
        # the 1-D tensors a step applies per row (norm weights, biases): name -> (offset,
        # size) in a variant's vector (sparse.py)
        self.vector_slots: dict[str, tuple[int, int]] = {}
        vector_params = [n for pair in self._norms for n in pair] + [self.final_norm_name]
        vector_params += [b for ps in self._products for p in ps for b in p.biases if b]
        params = dict(model.named_parameters())
        size = 0
        for n in vector_params:
            self.vector_slots[n] = (size, params[n].numel())
            size += params[n].numel()
        self.vector_size = size

    def vector(self, step: StepInput, name: str) -> torch.Tensor | None:
        """(G, n) fp32: the step's per-group delta of the 1-D tensor `name`, or None."""
        if step.vectors is None:
            return None
        offset, size = self.vector_slots[name]
        return step.vectors[:, offset : offset + size]

    # ------------------------------------------------------------------ pieces

    def _products_of(self, i: int) -> tuple[list[Product], Product, list[Product], Product]:
        """Layer i's products: q/k/v (one stacked or three), o, gate/up, down."""
        ps = self._products[i]
        n_attn = 1 if len(ps[0].sizes) == 3 else 3
        attn, o_proj, rest = ps[:n_attn], ps[n_attn], ps[n_attn + 1 :]
        return attn, o_proj, rest[:-1], rest[-1]

    def _rmsnorm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        dv: torch.Tensor | None,
        group: torch.Tensor | None,
    ) -> torch.Tensor:
        """As transformers' LlamaRMSNorm; with dv (G, n), row t uses weight + dv[group[t]]
        (rounded to the weight's dtype, as a materialized fine-tune would hold it)."""
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if dv is None or group is None:
            return weight * h.to(x.dtype)
        w = (weight.to(torch.float32) + dv).to(weight.dtype).index_select(0, group)
        return w * h.to(x.dtype)

    def _project(self, x: torch.Tensor, p: Product, step: StepInput) -> list[torch.Tensor]:
        """x (N, in) -> each member's output (N, rows): the resident weights' GEMM plus
        the step's sparse deltas over their rows."""
        if p.stacked is not None and p.weights_in_place():
            y = F.linear(x, p.stacked)
        elif len(p.mods) == 1:
            y = F.linear(x, p.mods[0].weight, p.mods[0].bias)
        else:  # a materialized variant rebound the weights: stack the outputs instead
            y = torch.cat([F.linear(x, m.weight, m.bias) for m in p.mods], dim=1)
        step.deltas.spmm_add_(y, x, p.slot)
        if step.vectors is not None and step.token_group is not None:
            start = 0
            for size, bias in zip(p.sizes, p.biases, strict=True):
                dv = self.vector(step, bias) if bias is not None else None
                if dv is not None:
                    y[:, start : start + size] += dv.index_select(0, step.token_group).to(y.dtype)
                start += size
        return list(y.split(p.sizes, dim=1)) if len(p.sizes) > 1 else [y]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, layer: int, q: torch.Tensor, step: StepInput) -> torch.Tensor:
        """q (N, H, D) -> (N, H*D), reading keys/values from the KV slots."""
        n, hkv, d = q.shape[0], self.n_kv, self.head_dim
        g = self.n_heads // hkv
        out = torch.empty((n, self.n_heads * d), dtype=q.dtype, device=q.device)
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        b = int(step.decode_idx.numel())
        if b:
            length = step.max_decode_len
            qd = q.index_select(0, step.decode_idx).view(b, hkv, g, d)
            kd = kc[step.decode_slots, :, :length]  # (B, Hkv, L, D)
            vd = vc[step.decode_slots, :, :length]
            keep = torch.arange(length, device=q.device)[None] < step.decode_lens[:, None]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep[:, None, None, :])
            out[step.decode_idx] = od.reshape(b, self.n_heads * d)
        for p in step.prefills:
            t, ctx = p.length, p.position + p.length
            qp = q[p.start : p.start + t].view(t, hkv, g, d).permute(1, 2, 0, 3)
            qp = qp.reshape(1, hkv, g * t, d)
            kp, vp = kc[p.slot, :, :ctx].unsqueeze(0), vc[p.slot, :, :ctx].unsqueeze(0)
            pos = torch.arange(p.position, ctx, device=q.device)
            keep = torch.arange(ctx, device=q.device)[None] <= pos[:, None]  # (T, ctx) causal
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep.repeat(g, 1))
            op = op.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, self.n_heads * d)
            out[p.start : p.start + t] = op
        return out

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """Logits (R, vocab) in fp32 for the rows in step.logits_idx."""
        n = int(step.ids.numel())
        h = F.embedding(step.ids, self.embed.weight)
        step.deltas.rowgather_add_(h, step.ids, self.slot_of[self.embed_name])
        cos, sin = self.rotary(h[None], step.positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # (N, 1, D)
        group = step.token_group
        for i, layer in enumerate(self.layers):
            attn, o_proj, gate_up, down_proj = self._products_of(i)
            in_norm, post_norm = self._norms[i]
            x = self._rmsnorm(h, layer.input_layernorm.weight, self.vector(step, in_norm), group)
            q, k, v = [y for p in attn for y in self._project(x, p, step)]
            q = q.reshape(n, self.n_heads, self.head_dim)
            k = k.reshape(n, self.n_kv, self.head_dim)
            v = v.reshape(n, self.n_kv, self.head_dim)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.kv.write_(i, step.slots, step.positions, k, v)
            h = h + self._project(self._attention(i, q, step), o_proj, step)[0]
            w = layer.post_attention_layernorm.weight
            x = self._rmsnorm(h, w, self.vector(step, post_norm), group)
            gate, up = [y for p in gate_up for y in self._project(x, p, step)]
            h = h + self._project(F.silu(gate) * up, down_proj, step)[0]
        last = h.index_select(0, step.logits_idx)
        final = self.vector(step, self.final_norm_name)
        last = self._rmsnorm(last, self.norm.weight, final, step.row_group)
        logits = F.linear(last, self.lm_head.weight)
        step.head_deltas.spmm_add_(logits, last, self.slot_of[self.head_name])
        return logits.float()
