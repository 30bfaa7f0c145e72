"""The checkpoints users bring, end to end (compress -> serve -> the fine-tune's text):
sharded with `model.safetensors.index.json`, in bf16 and fp16, with a tied or an untied
head, full fine-tunes beside PEFT LoRA adapters (densified) of the same family, the
fused Phi-3 tensors among the adapter's targets. The base is served in fp32 and every
variant's text equals its fine-tune's: the base's checkpoint values plus the delta, run
by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from deltastore.compress import CompressOptions, compress
from deltastore.format import Delta, load_delta, save_delta
from deltastore.materialize import add_tensor_delta, materialize
from deltastore.methods import Method
from deltastore.sources import fingerprint, open_finetune, open_model
from deltastore.testing import family_model, perturbed, save
from server.engine.kernels import KernelUnavailable
from server.engine.sparse import use_native
from tests.server.conftest import MAX_TOKENS, PROMPTS, reference_texts
from tests.server.engine.test_llm_engine import (
    assert_matches_reference,
    request,
    run,
    serving,
)

SHARD = "20KB"  # tiny models in several shards


def _dtypes(model_dir: Path) -> set[torch.dtype]:
    out = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            out |= {st.get_tensor(k).dtype for k in st.keys()}  # noqa: SIM118
    return out


def _finetune_texts(base_dir: Path, delta: Delta) -> dict[str, str]:
    """Greedy text of the fine-tune as the engine holds it in fp32: the base's
    checkpoint values plus the delta, run by transformers' generate."""
    src = open_model(base_dir)
    model, tok = src.load_model(torch.float32), src.load_tokenizer()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in delta.tensors.items():
            params[name].copy_(add_tensor_delta(params[name], t))
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        out[prompt] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    return out


def _adapter(base_dir: Path, path: Path, targets: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    model = open_model(base_dir).load_model(torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # an update large enough to change the greedy text
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(path)
    return path


CASES = {  # family, checkpoint dtype, the adapter's targets
    "llama3-untied-bf16": ("llama3", torch.bfloat16, ["q_proj", "v_proj", "down_proj"]),
    "qwen2-tied-fp16": ("qwen2", torch.float16, ["q_proj", "k_proj", "up_proj"]),
    "phi3-fused-bf16": ("phi3", torch.bfloat16, ["qkv_proj", "gate_up_proj", "o_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_sharded_half_precision_checkpoint_serves_full_and_lora_finetunes(case, tmp_path):
    family, dtype, targets = CASES[case]
    base_model = family_model(family, seed=21)
    ft_model = perturbed(base_model, 0.6, seed=22)
    base_dir = save(base_model.to(dtype), tmp_path / "base", max_shard_size=SHARD)
    ft_dir = save(ft_model.to(dtype), tmp_path / "ft", max_shard_size=SHARD)
    for d in (base_dir, ft_dir):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, "sharded"
        assert _dtypes(d) == {dtype}
    adapter = _adapter(base_dir, tmp_path / "adapter", targets, seed=23)
    base = open_model(base_dir)
    store = tmp_path / "store"
    store.mkdir()
    deltas = {}
    for name, source in (("full", ft_dir), ("lora", adapter)):
        opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=1, progress=False)
        deltas[name] = compress(base, open_finetune(base, source), opts)
        save_delta(store / f"{name}.delta.safetensors", deltas[name])
        assert deltas[name].meta.base_fingerprint == fingerprint(base)
    lora_names = {n.rsplit(".", 2)[-2] for n in deltas["lora"].tensors}
    assert lora_names == set(targets), "a delta names the checkpoint's tensors (fused ones too)"
    head_is_own = "lm_head.weight" in base.names()
    assert head_is_own == (not base_model.config.tie_word_embeddings)
    assert ("lm_head.weight" in deltas["full"].tensors) == head_is_own

    mat = materialize(base, load_delta(store / "full.delta.safetensors"), tmp_path / "mat")
    assert _dtypes(mat) == {dtype}, "materialize writes the checkpoint's dtype"

    refs: dict[str | None, dict[str, str]] = {None: reference_texts(base_dir, PROMPTS)}
    refs |= {name: _finetune_texts(base_dir, d) for name, d in deltas.items()}
    assert len({tuple(r.values()) for r in refs.values()}) == 3, "each variant its own text"
    files = {name: store / f"{name}.delta.safetensors" for name in deltas}
    with serving(
        {"base": base_dir}, files, tmp_path / "srv", max_batch_size=16, max_step_tokens=16
    ) as srv:
        assert srv.engine.dtype == torch.float32
        reqs = [request(srv.engine, m, p) for p in PROMPTS for m in (None, *files)]
        run(srv, reqs)
    for r in reqs:
        assert_matches_reference(r, refs)
    srv.engine.activate(None)
    for n, p in srv.engine.params.items():  # bit-exact: the checkpoint's values, upcast
        assert torch.equal(p.detach(), base.get(n).to(p.dtype)), n


def test_an_fp16_checkpoint_serves_in_fp16_on_the_cpu(tmp_path):
    """--dtype float16 on the CPU: the C kernel computes in fp32 and bf16, so the steps
    take the torch reference (auto) and every request is served; --delta-kernel native
    says why it cannot."""
    base_model = family_model("llama3", seed=31)
    base_dir = save(base_model.half(), tmp_path / "base")
    ft_dir = save(perturbed(base_model.float(), 0.6, seed=32).half(), tmp_path / "ft")
    base = open_model(base_dir)
    opts = CompressOptions(method=Method.DAREX_Q, rate=0.5, q=0.7, seed=1, progress=False)
    path = tmp_path / "v.delta.safetensors"
    save_delta(path, compress(base, open_finetune(base, ft_dir), opts))
    with pytest.raises(KernelUnavailable, match=r"not torch\.float16"):
        use_native("native", torch.device("cpu"), torch.float16)
    with serving({"base": base_dir}, {"v": path}, tmp_path / "srv", dtype="float16") as srv:
        assert srv.engine.dtype == torch.float16 and not srv.scheduler.native
        reqs = [request(srv.engine, m, p) for p in PROMPTS for m in (None, "v")]
        run(srv, reqs)
    assert all(r.outcome == "done" and r.job.completion_tokens > 0 for r in reqs)
