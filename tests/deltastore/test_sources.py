import json
import shutil
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from deltastore.sources import (
    FullFinetune,
    LoraFinetune,
    SourceError,
    fingerprint,
    open_finetune,
    open_model,
)
from deltastore.testing import FAMILY_CONFIGS, family_model
from tests.conftest import make_model, perturbed, save, tiny_tokenizer


def test_sharded_equals_single(tmp_path):
    model = make_model(0)
    single = open_model(save(model, tmp_path / "single"))
    sharded = open_model(save(model, tmp_path / "sharded", max_shard_size="20KB"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert set(single.names()) == set(sharded.names())
    for n in single.names():
        assert torch.equal(single.get(n), sharded.get(n))
    assert fingerprint(single) == fingerprint(sharded)


def test_tied_head_is_one_tensor(tiny_dirs):
    names = open_model(tiny_dirs["base"]).names()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_fingerprint_is_cached_and_changes_with_the_base(tmp_path):
    a = open_model(save(make_model(0), tmp_path / "a"))
    b = open_model(save(make_model(1), tmp_path / "b"))
    fa = fingerprint(a)
    assert (tmp_path / "a" / ".deltaserve-fingerprint.json").is_file()
    assert fingerprint(a) == fa != fingerprint(b)


def test_full_finetune_deltas(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, tiny_dirs["ft"])
    assert isinstance(ft, FullFinetune)
    ft_model = open_model(tiny_dirs["ft"])
    for name, d in ft.deltas():
        assert d.dtype == torch.float32
        assert torch.equal(d, ft_model.get(name) - base.get(name))


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_dirs):
    other = save(make_model(0, intermediate_size=48), tmp_path / "other")
    base = open_model(tiny_dirs["base"])
    with pytest.raises(SourceError, match=r"mlp\..*_proj\.weight: shape"):
        list(open_finetune(base, other).deltas())


def test_missing_tensor_and_architecture(tmp_path, tiny_dirs):
    base = open_model(tiny_dirs["base"])
    deeper = save(make_model(0, num_hidden_layers=3), tmp_path / "deeper")
    with pytest.raises(SourceError, match=r"layers\.2"):
        open_finetune(base, deeper)
    cfg = json.loads((tiny_dirs["base"] / "config.json").read_text())
    odd = tmp_path / "odd"
    save(make_model(0), odd)
    (odd / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))
    with pytest.raises(SourceError, match="architecture"):
        open_finetune(base, odd)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_model(tmp_path / "nothing")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(SourceError, match="pickled"):
        open_model(tmp_path / "pickled")
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(SourceError, match="not GGUF"):
        open_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_delta_equals_peft_merge(tmp_path, tiny_dirs, rslora):
    base = open_model(tiny_dirs["base"])
    model = base.load_model()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        use_rslora=rslora,
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ft = open_finetune(base, tmp_path / "adapter")
    assert isinstance(ft, LoraFinetune)
    seen = set()
    for name, d in ft.deltas():
        seen.add(name)
        torch.testing.assert_close(base.get(name) + d, merged[name], rtol=1e-5, atol=1e-6)
    assert len(seen) == 3 * 2  # 3 modules x 2 layers
    assert all(torch.equal(base.get(n), merged[n]) for n in base.names() if n not in seen)


def test_lora_errors(tmp_path, tiny_dirs):
    base = open_model(tiny_dirs["base"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True})
    )
    with pytest.raises(SourceError, match="use_dora"):
        open_finetune(base, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(SourceError, match=r"adapter_model\.safetensors"):
        open_finetune(base, adapter)
    with pytest.raises(SourceError, match="LoRA adapter, not a full model"):
        open_model(adapter)


def test_finetune_model_is_base_plus_deltas(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, tiny_dirs["ft"])
    direct = open_model(tiny_dirs["ft"]).load_model()
    via_deltas = super(FullFinetune, ft).load_model()  # the generic base + deltas path
    for (n, a), (_, b) in zip(
        direct.named_parameters(), via_deltas.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    x = torch.randint(0, 256, (1, 10))
    torch.testing.assert_close(direct(x).logits, via_deltas(x).logits, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- vocabulary


def test_a_finetune_that_resized_the_vocabulary_is_refused_with_the_sizes(tmp_path, tiny_dirs):
    base = open_model(tiny_dirs["base"])
    model = base.load_model()
    model.resize_token_embeddings(262)  # two added tokens
    tok = tiny_tokenizer()
    tok.add_tokens(["<tool>", "</tool>"])
    ft = tmp_path / "ft"
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    with pytest.raises(SourceError, match=r"resized the vocabulary from 260 to 262 tokens \(\+2\)"):
        open_finetune(base, ft)


def test_a_tokenizer_with_added_tokens_is_refused_naming_them(tmp_path, tiny_dirs):
    """The embedding keeps its rows (the tokens went into spare ones), but the server
    would read and write text with the base's tokenizer: refused, tokens named."""
    base = open_model(tiny_dirs["base"])
    tok = tiny_tokenizer()
    tok.add_tokens(["<tool>"])  # id 258: a row the base's tokenizer has no token for
    assert len(tok) <= base.config.vocab_size
    ft = tmp_path / "ft"
    shutil.copytree(tiny_dirs["ft"], ft)
    tok.save_pretrained(ft)
    with pytest.raises(SourceError, match=r"1 tokens the base's lacks.*'<tool>' \(id 258\)"):
        open_finetune(base, ft)
    adapter = _peft_adapter(base, tmp_path / "adapter", ["q_proj"])
    tok.save_pretrained(adapter)  # the same, beside an adapter
    with pytest.raises(SourceError, match="'<tool>'"):
        open_finetune(base, adapter)


def test_a_base_that_carries_the_added_tokens_serves_their_finetunes(tmp_path, tiny_dirs):
    """README's way: resize the base to the fine-tunes' vocabulary, with their
    tokenizer; then they are deltas of it like any other."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<tool>", "</tool>"])
    base_model = open_model(tiny_dirs["base"]).load_model()
    base_model.resize_token_embeddings(len(tok))
    base_dir = tmp_path / "base"
    base_model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    ft_model = perturbed(base_model, 0.1, seed=3)
    ft_dir = tmp_path / "ft"
    ft_model.save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)
    base = open_model(base_dir)
    names = {n for n, _ in open_finetune(base, ft_dir).deltas()}
    assert "model.embed_tokens.weight" in names


def test_an_adapter_with_tensors_other_than_lora_factors_is_refused(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    base = open_model(tiny_dirs["base"])
    adapter = _peft_adapter(base, tmp_path / "adapter", ["q_proj"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    tensors[key] = torch.zeros(2, 32)  # PEFT's trainable tokens: not a LoRA factor
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SourceError, match="trainable_tokens_delta"):
        open_finetune(base, adapter)


# --------------------------------------------------------------------------- PEFT per family


def _peft_adapter(base: Any, path: Any, targets: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(base.load_model(), cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_a_peft_adapter_on_each_family_densifies_to_its_merge(tmp_path, family):
    """Every linear layer targeted ("all-linear": Phi-3's fused qkv_proj and gate_up_proj
    among them): base + each densified delta equals PEFT's own merge."""
    base = open_model(save(family_model(family), tmp_path / "base"))
    model = base.load_model()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    seen = set()
    for name, d in open_finetune(base, tmp_path / "adapter").deltas():
        seen.add(name)
        torch.testing.assert_close(base.get(name) + d, merged[name], rtol=1e-5, atol=1e-6)
    matrices = {n for n in base.names() if len(base.shape(n)) == 2 and "embed" not in n}
    matrices.discard("lm_head.weight")
    assert seen == matrices
