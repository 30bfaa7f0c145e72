"""One step's forward: packed tokens of many sequences and variants -> logits.

The runner computes a Llama-family decoder (LlamaForCausalLM and the models that
share its layout) directly from the resident parameters of the transformers model,
gpt-fast style, so that one step can serve tokens of many variants:

    tokens (N,) packed: each sequence's tokens contiguous, each variant's contiguous
    h = embed(ids) + row gather of each variant's embedding delta
    per layer:  x = rmsnorm(h) * (w + Δw_variant(t))          (per-token vector deltas)
                y = x @ W.T + Σ_v sign_v · x[rows_v] @ Δ_v.T   (StepDeltas.spmm_add_)
                attention over the KV slots (decode rows batched, prefill per chunk)
    logits for the rows that sample: h @ E.T + each variant's lm_head/embedding delta

The weights are read from the model's modules at every step, so a variant merged in
place (apply_delta_) or materialized (parameter storage rebound) by the Engine is
what the dense GEMMs see; `StepDeltas` then carries the other variants' deltas, with
the merged one subtracted for rows that are not its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from server.runtime.kv_cache import KVCache
from server.runtime.sparse import StepDeltas

SUPPORTED = {"llama", "mistral", "qwen2"}  # same decoder layout; no sliding window used
MATRICES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class UnsupportedModel(ValueError):
    pass


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


@dataclass
class Prefill:
    start: int  # first token in the packed step
    length: int  # tokens of this chunk
    slot: int
    position: int  # position of the chunk's first token


@dataclass
class StepInput:
    """One step, packed. Built by the scheduler (see scheduler.py `_pack`)."""

    ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    slots: torch.Tensor  # (N,) int64 KV slot of each token
    decode_idx: torch.Tensor  # (B,) int64 packed index of each decode row
    decode_slots: torch.Tensor  # (B,) int64
    decode_lens: torch.Tensor  # (B,) int64 context length after this token
    prefills: list[Prefill]
    logits_idx: torch.Tensor  # (R,) int64 packed index of the rows that sample
    deltas: StepDeltas  # over the N packed tokens
    head_deltas: StepDeltas  # over the R sampling rows
    # 1-D deltas (norm weights, biases) per group of rows: name -> (G, n) fp32, and the
    # group of each packed token (N,) and of each sampling row (R,)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    token_group: torch.Tensor | None = None
    row_group: torch.Tensor | None = None


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
        self._mods: list[list[tuple[Any, int, str, str | None]]] = []
        for layer in self.layers:
            mods = []
            for path in MATRICES:
                mod = layer.get_submodule(path)
                name = names[id(mod.weight)]
                bias = names[id(mod.bias)] if getattr(mod, "bias", None) is not None else None
                mods.append((mod, len(self.matrix_names), name, bias))
                self.matrix_names.append(name)
            self._mods.append(mods)
        self.slot_of = {n: i for i, n in enumerate(self.matrix_names)}
        self._norms = [
            (names[id(la.input_layernorm.weight)], names[id(la.post_attention_layernorm.weight)])
            for la in self.layers
        ]
        self.final_norm_name = names[id(self.norm.weight)]

    # ------------------------------------------------------------------ pieces

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

    def _linear(
        self, x: torch.Tensor, mod: Any, slot: int, name: str, bias: str | None, step: StepInput
    ) -> torch.Tensor:
        y = F.linear(x, mod.weight, mod.bias)
        step.deltas.spmm_add_(y, x, slot, name)
        if bias is not None and bias in step.vectors and step.token_group is not None:
            y += step.vectors[bias].index_select(0, step.token_group).to(y.dtype)
        return y

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
            length = int(step.decode_lens.max())
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
        step.deltas.rowgather_add_(h, step.ids, self.slot_of[self.embed_name], self.embed_name)
        cos, sin = self.rotary(h[None], step.positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # (N, 1, D)
        vec, group = step.vectors, step.token_group
        for i, layer in enumerate(self.layers):
            q_m, k_m, v_m, o_m, gate_m, up_m, down_m = self._mods[i]
            in_norm, post_norm = self._norms[i]
            x = self._rmsnorm(h, layer.input_layernorm.weight, vec.get(in_norm), group)
            q = self._linear(x, *q_m, step).view(n, self.n_heads, self.head_dim)
            k = self._linear(x, *k_m, step).view(n, self.n_kv, self.head_dim)
            v = self._linear(x, *v_m, step).view(n, self.n_kv, self.head_dim)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.kv.write_(i, step.slots, step.positions, k, v)
            h = h + self._linear(self._attention(i, q, step), *o_m, step)
            x = self._rmsnorm(h, layer.post_attention_layernorm.weight, vec.get(post_norm), group)
            mlp = F.silu(self._linear(x, *gate_m, step)) * self._linear(x, *up_m, step)
            h = h + self._linear(mlp, *down_m, step)
        last = h.index_select(0, step.logits_idx)
        final = vec.get(self.final_norm_name)
        last = self._rmsnorm(last, self.norm.weight, final, step.row_group)
        logits = F.linear(last, self.lm_head.weight)
        head = self.slot_of[self.head_name]
        step.head_deltas.spmm_add_(logits, last, head, self.head_name)
        return logits.float()
