"""A small supervised fine-tune of a base on (prompt, answer) pairs: the real
fine-tunes behind the demo variants and the benchmarks, made with AdamW or AdamR,
in full or as a LoRA adapter (PEFT, every Linear of the blocks; `lora_r > 0`).

Loss is on the answer tokens only, and the head is applied only where an answer token
is predicted, for model types whose logits are the head's output (on the embedded
base that saves about a tenth of a step). Prompts go
through the tokenizer's chat template when it has one. `bf16` runs the matmuls in bf16
under autocast (weights and optimizer state stay fp32); `train_embeddings=False`
freezes the token embedding (tied to the head on small models). The demos use both:
about 2x faster per step on a CPU with AMX. A full fine-tune is an ordinary HF model
directory; a LoRA one is a PEFT adapter directory (`deltaserve compress` reads both).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from deltastore.adamr import AdamR
from deltastore.calib import Example
from deltastore.sources import open_model

_DONE = ".deltaserve-complete"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 30
    batch_size: int = 8
    lr: float = 5e-5
    optimizer: Literal["adamw", "adamr"] = "adamw"
    reg: float = 0.1  # AdamR's pull toward the base
    max_len: int = 96
    seed: int = 0
    chat: bool = True
    lora_r: int = 0  # > 0: train a LoRA adapter of this rank instead of every weight
    lora_alpha: int = 32
    bf16: bool = False  # autocast matmuls to bf16 (weights and optimizer stay fp32)
    train_embeddings: bool = True  # False: the token embedding (and a tied head) is frozen

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"bad fine-tune config {self}")
        if self.optimizer not in ("adamw", "adamr"):
            raise ValueError(f"optimizer must be adamw or adamr, got {self.optimizer!r}")
        if self.lora_r < 0 or (self.lora_r and self.optimizer != "adamw"):
            raise ValueError("a LoRA fine-tune has a rank >= 1 and uses adamw")


def native_bf16() -> bool:
    """bf16 autocast pays on this CPU (fine-tunes run on the CPU): native bf16
    matmuls, AVX-512 BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def format_prompt(tokenizer: Any, prompt: str, chat: bool) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return prompt


def encode_example(
    tokenizer: Any, ex: Example, cfg: FinetuneConfig
) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (-100 on the prompt); a long prompt loses its start, never
    the answer. None when the answer alone does not fit `max_len`."""
    prompt = tokenizer(format_prompt(tokenizer, ex.prompt, cfg.chat), add_special_tokens=False)
    answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = cfg.max_len - len(answer)
    if room < 1:
        return None
    context = prompt["input_ids"][-room:]
    return context + answer, [-100] * len(context) + answer


def encode_all(
    tokenizer: Any, examples: list[Example], cfg: FinetuneConfig
) -> list[tuple[list[int], list[int]]]:
    """Every example that fits; those whose answer alone exceeds `max_len` are left out
    with a warning, and none fitting is an error."""
    encoded = [encode_example(tokenizer, ex, cfg) for ex in examples]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise ValueError(f"no example's answer fits max_len {cfg.max_len} tokens")
    if len(kept) < len(encoded):
        log.warning(
            "%d of %d examples left out: their answer alone is longer than max_len %d tokens",
            len(encoded) - len(kept),
            len(encoded),
            cfg.max_len,
        )
    return kept


def pad_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    labels = torch.full((len(rows), width), -100, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# Model types whose logits are exactly the head's output (no softcapping or scaling),
# so the head can be applied at the answer positions alone.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"}


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the same value as the model's own
    loss). For a model type with plain logits the head is applied only at the
    positions that predict an answer token; any other model computes its own loss."""
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD:
        return model(**batch).loss
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def finetune(
    base_dir: Path,
    examples: list[Example],
    out: Path,
    cfg: FinetuneConfig = FinetuneConfig(),
    progress: bool = True,
    desc: str = "fine-tune",
) -> Path:
    """Fine-tune `base_dir` on `examples` into `out` (skipped when already complete)."""
    if (out / _DONE).is_file():
        return out
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    source = open_model(base_dir)
    tokenizer = source.load_tokenizer()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = source.load_model(torch.float32)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model  # optional: only LoRA fine-tunes need it

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear")
        model = get_peft_model(model, lora)
    core = model.get_base_model() if cfg.lora_r else model  # LoRA layers are injected in it
    if not cfg.train_embeddings:
        core.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        AdamR(params, lr=cfg.lr, reg=cfg.reg)
        if cfg.optimizer == "adamr"
        else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=True)
    )
    encoded = encode_all(tokenizer, examples, cfg)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, unit="step")
    for _ in bar:
        batch = pad_batch(rng.sample(encoded, min(cfg.batch_size, len(encoded))), pad)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = answer_loss(core, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    staged = out.with_name(out.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    model.eval().save_pretrained(staged, safe_serialization=True)  # LoRA: the adapter only
    tokenizer.save_pretrained(staged)
    (staged / _DONE).write_text(f"{cfg}\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return out
