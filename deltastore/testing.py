"""Tiny models built on the spot (never downloaded): the test suite's, and the
benchmarks' when they need a model of a given shape without fetching one; and the
greedy text of a model directory from plain transformers, the reference that served
outputs are compared with. A Llama by default; `family_model` builds one of each family
engine v2 serves, its quirks switched on at a size where they change the outputs
(windows shorter than the prompts, small soft-caps, partial and long rope)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from deltastore.sources import open_model


def tiny_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: 256 byte tokens plus <eos> and <pad>, and
    filler tokens (`tok<i>`) up to `vocab_size` (a synthetic model's vocabulary)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab |= {"<eos>": len(vocab), "<pad>": len(vocab) + 1}
    vocab |= {f"tok{i}": i for i in range(len(vocab), vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_config(**kw: Any) -> LlamaConfig:
    cfg: dict[str, Any] = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        initializer_range=0.2,  # large enough that outputs depend on the weights
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=256,
        pad_token_id=257,
        bos_token_id=None,
    )
    cfg.update(kw)
    return LlamaConfig(**cfg)


def make_model(seed: int = 0, **kw: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def perturbed(model: Any, scale: float, seed: int) -> Any:
    """A 'fine-tune': every parameter moved by Gaussian noise of std scale*std(W)."""
    g = torch.Generator().manual_seed(seed)
    ft = type(model)(model.config).eval()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=g) * scale * max(std, 1e-3))
    return ft


def save(model: Any, path: Path, **kw: Any) -> Path:
    model.save_pretrained(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path


def reference_text(model_dir: Path, prompt: str, max_tokens: int = 12) -> str:
    """Greedy completion of `prompt` (`max_tokens` new tokens) by the model in
    `model_dir`, loaded and run in plain transformers."""
    return reference_texts(model_dir, [prompt], max_tokens)[prompt]


def reference_texts(model_dir: Path, prompts: list[str], max_tokens: int = 12) -> dict[str, str]:
    """`reference_text` of each prompt, the model loaded once."""
    src = open_model(model_dir)
    model, tok = src.load_model(), src.load_tokenizer()
    out = {}
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out[prompt] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    return out


# A tiny config of each family engine v2 serves: model_type and what differs from the
# Llama of `tiny_config` (the heads, sizes and vocabulary are shared).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3": dict(  # Llama 3.x: llama3 rope scaling, an untied head, GQA
        model_type="llama",
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral": dict(model_type="mistral", sliding_window=5, tie_word_embeddings=False),
    "qwen2": dict(  # q/k/v biases; the second layer slides
        model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "qwen3": dict(model_type="qwen3"),  # q/k norms per head
    "gemma2": dict(
        model_type="gemma2",
        sliding_window=5,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        final_logit_softcapping=3.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "phi3": dict(  # fused qkv_proj and gate_up_proj, half the head rotated, a window
        model_type="phi3",
        sliding_window=6,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ),
    "phi4-mini": dict(  # Phi-4-mini's layout: tied, longrope past 8 positions, 3/4 rotated
        model_type="phi3",
        tie_word_embeddings=True,
        original_max_position_embeddings=8,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            partial_rotary_factor=0.75,
            short_factor=[1.0, 1.5, 2.0],
            long_factor=[3.0, 5.0, 8.0],
            original_max_position_embeddings=8,
        ),
    ),
}


def family_config(family: str, **kw: Any) -> Any:
    """The tiny config of `family` (a key of FAMILY_CONFIGS), with `kw` on top."""
    spec = {**FAMILY_CONFIGS[family], **kw}
    model_type = spec.pop("model_type")
    shared = tiny_config().to_dict()
    keep = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "initializer_range",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
    ]
    base = {k: shared[k] for k in keep} | {"head_dim": 8}
    return AutoConfig.for_model(model_type, **(base | spec))


def family_model(family: str, seed: int = 0, **kw: Any) -> PreTrainedModel:
    """A random model of `family`; its norm weights and biases are random too (they
    start as constants), so that every 1-D tensor changes the outputs."""
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(family_config(family, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.2)
    return model.eval()


def dare_positions(numel: int, rate: float, g: torch.Generator) -> torch.Tensor:
    """The kept positions of a DARE mask at `rate` over `numel` entries, drawn directly
    (sorted, unique, about numel·(1-p) of them): what a Bernoulli mask keeps, without a
    pass over every entry (a variant of the 135M base in ~0.5 s, its file written)."""
    k = max(1, round(numel * (1 - rate)))
    return torch.unique(torch.randint(numel, (k,), generator=g))
