"""One engine step outside the engine, for tests of the forward against transformers:
a runner over a KV cache that starts as NaN (what uninitialized memory may hold, so a
read of a position never written or cleaned shows in the logits), and a step that
cleans the decode rows' slots as the engine does before it packs and runs them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from deltastore.apply import FlatWeights
from server.engine.batch import Packing, pack
from server.engine.kernels import Attend, Linear
from server.engine.kv_cache import KVCache
from server.engine.model_runner import ModelRunner
from server.engine.sequence import Sequence

CPU = torch.device("cpu")


def nan_runner(
    model: Any, max_len: int = 64, linear: Linear = F.linear, attend: Attend | None = None
) -> tuple[ModelRunner, Packing]:
    FlatWeights.from_module(model)  # adjacent weights, as the engine lays them out
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    kv = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, 8, max_len, 1 << 22, 4, dtype, CPU)
    for t in kv.k + kv.v:
        t.fill_(float("nan"))
    runner = ModelRunner(model, kv, linear, attend)
    how = Packing(lambda name: None, cfg.vocab_size, runner.vector_size, CPU)  # type: ignore[arg-type,return-value]
    return runner, how


def forward(
    runner: ModelRunner,
    how: Packing,
    decode: list[Sequence],
    chunks: list[tuple[Sequence, int]],
) -> torch.Tensor:
    runner.kv.clean_for_decode([(s.slot, s.length) for s in decode])
    return runner.forward(pack(decode, chunks, None, how).step)
