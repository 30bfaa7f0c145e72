"""A model whose weights stay in their files: each module's parameters are read just
before its forward and dropped right after it, so a calibration pass or one q-search
evaluation holds one module's weights at a time instead of the whole model (an 8B
model is 16 GB in bf16; its largest module, the 128k-vocabulary head, 1 GB).

Every forward reads the whole model again (from the page cache when it fits, else
from disk): slower than a resident model, and the way a model larger than memory
compresses at all. The weights are exactly those the resident path computes: the
source tensor cast to the dtype, and for a trial delta its kept values times their
scale added in fp32 at the kept positions and cast back (`apply_delta_`'s
arithmetic), so a streamed q search scores the same models, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltastore.format import TensorDelta
from deltastore.qsearch import trial_tensors
from deltastore.sources import (
    FinetuneSource,
    FullFinetune,
    LoraFinetune,
    ModelSource,
    SafetensorsModel,
)

WeightFn = Callable[[str], torch.Tensor]  # canonical parameter name -> tensor in the dtype


def skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The transformers model for `config` with its parameters on the meta device (no
    memory) and its buffers (rotary frequencies) real, as loading computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head is the embedding's parameter, as loading makes it
    return model.eval()


class StreamedModel:
    """`model` computes with weights read per module from `weight`; `weight` may be
    swapped between forwards (a trial delta)."""

    def __init__(self, config: Any, dtype: torch.dtype, weight: WeightFn) -> None:
        self.model = skeleton(config, dtype)
        self.dtype = dtype
        self.weight = weight
        canonical: dict[int, str] = {}  # tied parameters: the first name wins
        for name, p in self.model.named_parameters():
            canonical.setdefault(id(p), name)
        for module in self.model.modules():
            own = [(a, canonical[id(p)]) for a, p in module._parameters.items() if p is not None]
            if own:
                module.register_forward_pre_hook(self._loader(own))
                module.register_forward_hook(self._dropper(own))
        # transformers reads a model's device and dtype from its first parameter
        # (generate does): a zero-size one on the CPU comes first
        anchor = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        self.model._parameters = {"_streamed_anchor": anchor, **self.model._parameters}

    def _loader(self, own: list[tuple[str, str]]) -> Callable[..., None]:
        def load(module: nn.Module, _args: Any) -> None:
            for attr, name in own:
                w = self.weight(name)
                module._parameters[attr] = nn.Parameter(w, requires_grad=False)

        return load

    def _dropper(self, own: list[tuple[str, str]]) -> Callable[..., None]:
        def drop(module: nn.Module, _args: Any, _out: Any) -> None:
            for attr, _ in own:
                p = module._parameters[attr]
                assert p is not None
                module._parameters[attr] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
                )

        return drop


def source_weight(source: ModelSource | FinetuneSource, dtype: torch.dtype) -> WeightFn:
    """Each tensor as `source.load_model(dtype)` holds it. Reads safetensors bases,
    full fine-tunes of them and LoRA adapters on them."""
    if isinstance(source, FullFinetune):
        return source_weight(source.finetuned, dtype)
    if isinstance(source, LoraFinetune):
        # LoRA: the fp32 base plus the densified delta, then cast (its load_model)
        base = source_weight(source.base, torch.float32)

        def finetuned(name: str) -> torch.Tensor:
            w = base(name)
            delta = source.delta(name)
            return (w if delta is None else w + delta).to(dtype)

        return finetuned
    if not isinstance(source, SafetensorsModel):  # GGUF, or a fine-tune of one
        raise ValueError(
            f"{source}: streamed weights are read from safetensors directories; "
            "convert the model, or compress without --stream-weights"
        )
    return lambda name: source.get(name).to(dtype)


def streamed(source: ModelSource | FinetuneSource, dtype: torch.dtype) -> nn.Module:
    """`source.load_model(dtype)`, its weights left in the files."""
    config = source.base.config if isinstance(source, FinetuneSource) else source.config
    model = StreamedModel(config, dtype, source_weight(source, dtype)).model
    if isinstance(source, LoraFinetune):
        model.to(dtype)  # its load_model casts an fp32 model, rotary buffers included
    return model


def add_delta_(w: torch.Tensor, t: TensorDelta, scale: float) -> torch.Tensor:
    """w (any shape, the weights' dtype) with t's kept values times `scale` added at
    their positions, in fp32, as `apply_delta_` adds them."""
    flat = w.view(-1)
    old = flat[t.positions]
    flat[t.positions] = torch.add(old.to(torch.float32), t.values.to(torch.float32) * scale).to(
        w.dtype
    )
    return w


class StreamedDeltaModel:
    """`ScaledDeltaModel` with the base streamed: the trial delta is added to each
    tensor as it is read."""

    def __init__(
        self,
        base: ModelSource,
        dtype: torch.dtype,
        tensors: list[TensorDelta],
        fixed: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._read = source_weight(base, dtype)
        self.tensors = tensors
        self.fixed = fixed or {}
        self._streamed = StreamedModel(base.config, dtype, self._read)
        self.model = self._streamed.model

    @contextmanager
    def scaled(self, scales: dict[str, float]) -> Iterator[nn.Module]:
        tensors = {t.name: t for t in trial_tensors(self.tensors, self.fixed, scales)}

        def weight(name: str) -> torch.Tensor:
            t = tensors.get(name)
            if t is None:
                return self._read(name)
            # a copy: the read tensor may share memory with the file
            return add_delta_(self._read(name).clone(), t, scales.get(name, t.scale))

        self._streamed.weight = weight
        try:
            yield self.model
        finally:
            self._streamed.weight = self._read
