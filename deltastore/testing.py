"""Tiny Llama models built on the spot (never downloaded): the test suite's, and the
benchmarks' when they need a model of a given shape without fetching one; and the
greedy text of a model directory from plain transformers, the reference that served
outputs are compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A 'fine-tune': every parameter moved by Gaussian noise of std scale*std(W)."""
    g = torch.Generator().manual_seed(seed)
    ft = LlamaForCausalLM(model.config).eval()
    ft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.add_(torch.randn(p.shape, generator=g) * scale * max(std, 1e-3))
    return ft


def save(model: LlamaForCausalLM, path: Path, **kw: Any) -> Path:
    model.save_pretrained(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path


def reference_text(model_dir: Path, prompt: str, max_tokens: int = 12) -> str:
    """Greedy completion of `prompt` (`max_tokens` new tokens) by the model in
    `model_dir`, loaded and run in plain transformers."""
    src = open_model(model_dir)
    model, tok = src.load_model(), src.load_tokenizer()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
