"""The fine-tunes behind the demos and the fidelity benchmark, on a tiny base."""

import pytest
import torch

from deltastore.calib import Example
from deltastore.finetune import FinetuneConfig, finetune
from deltastore.sources import LoraFinetune, open_finetune, open_model

EXAMPLES = [Example(f"{a}+{b}=", str(a + b)) for a in range(6) for b in range(6)]


def _mean_abs(base_dir, ft_dir):
    base = open_model(base_dir)
    deltas = dict(open_finetune(base, ft_dir).deltas())
    n = sum(d.numel() for d in deltas.values())
    return sum(float(d.abs().sum()) for d in deltas.values()) / n, deltas


def test_full_finetune_adamw_and_adamr(tiny_dirs, tmp_path):
    cfg = FinetuneConfig(steps=6, batch_size=4, lr=1e-3, max_len=32)
    adamw = finetune(tiny_dirs["base"], EXAMPLES, tmp_path / "w", cfg, progress=False)
    adamr_cfg = FinetuneConfig(
        steps=6, batch_size=4, lr=1e-3, max_len=32, optimizer="adamr", reg=5.0
    )
    adamr = finetune(tiny_dirs["base"], EXAMPLES, tmp_path / "r", adamr_cfg, progress=False)
    w, _ = _mean_abs(tiny_dirs["base"], adamw)
    r, _ = _mean_abs(tiny_dirs["base"], adamr)
    assert w > 0 and r > 0
    assert r < w  # AdamR pulls the weights back toward the base
    stamp = (adamw / ".deltaserve-complete").stat().st_mtime_ns
    finetune(tiny_dirs["base"], EXAMPLES, adamw, cfg, progress=False)  # cached: not redone
    assert (adamw / ".deltaserve-complete").stat().st_mtime_ns == stamp


def test_lora_finetune_is_a_peft_adapter(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    cfg = FinetuneConfig(steps=4, batch_size=4, lr=1e-2, max_len=32, lora_r=4, lora_alpha=8)
    out = finetune(tiny_dirs["base"], EXAMPLES, tmp_path / "lora", cfg, progress=False)
    assert (out / "adapter_config.json").is_file()
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, out)
    assert isinstance(ft, LoraFinetune)
    deltas = dict(ft.deltas())
    # every Linear of the blocks, nothing else (embeddings and norms untouched)
    assert deltas and all(".layers." in n and n.endswith("proj.weight") for n in deltas)
    assert any(float(d.abs().max()) > 0 for d in deltas.values())
    # the densified delta is what PEFT's own merge adds to the base
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base.load_model(torch.float32), out).merge_and_unload()
    name = next(iter(deltas))
    want = dict(merged.named_parameters())[name] - base.get(name).float()
    torch.testing.assert_close(deltas[name], want, rtol=1e-4, atol=1e-6)


def test_bad_configs():
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneConfig(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LoRA"):
        FinetuneConfig(lora_r=4, optimizer="adamr")
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)


def test_answer_loss_is_the_models_own_loss(tiny_dirs):
    """The head applied only where an answer token is predicted gives the same loss
    (and gradient) as the model's full-sequence loss."""
    from deltastore.finetune import answer_loss, encode_all, pad_batch

    source = open_model(tiny_dirs["base"])
    tokenizer, model = source.load_tokenizer(), source.load_model(torch.float32)
    cfg = FinetuneConfig(max_len=32)
    batch = pad_batch(encode_all(tokenizer, EXAMPLES[:5], cfg), tokenizer.eos_token_id)
    ours = answer_loss(model, batch)
    theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, model.model.layers[0].mlp.up_proj.weight)
    (g_theirs,) = torch.autograd.grad(theirs, model.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)


def test_bf16_with_frozen_embeddings_trains_the_blocks_only(tiny_dirs, tmp_path):
    """The demos' fast recipe: bf16 matmuls, the (tied) embedding left as the base."""
    cfg = FinetuneConfig(
        steps=6, batch_size=4, lr=1e-3, max_len=32, bf16=True, train_embeddings=False
    )
    out = finetune(tiny_dirs["base"], EXAMPLES, tmp_path / "fast", cfg, progress=False)
    _, deltas = _mean_abs(tiny_dirs["base"], out)
    embed = [n for n in deltas if n.endswith("embed_tokens.weight")]
    assert embed and all(float(deltas[n].abs().max()) == 0 for n in embed)
    blocks = [d for n, d in deltas.items() if ".layers." in n]
    assert any(float(d.abs().max()) > 0 for d in blocks)


def test_a_demo_recipe_names_its_cache_file(tiny_dirs, tmp_path, monkeypatch):
    """A changed recipe is made again, never served from a stale cache entry."""
    from dataclasses import replace

    from deltastore.demo import DEMOS

    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path))
    demo, base = DEMOS[0], tiny_dirs["base"]
    same = replace(demo, config=replace(demo.config))
    assert same.cache_path(base) == demo.cache_path(base)
    assert demo.cache_path(base).parent == tmp_path / "demo"
    for changed in (
        replace(demo, config=replace(demo.config, steps=demo.config.steps + 1)),
        replace(demo, task="topic"),
        replace(demo, calib_tokens=demo.calib_tokens * 2),
    ):
        assert changed.cache_path(base) != demo.cache_path(base)
    assert demo.cache_path(tiny_dirs["ft"]) != demo.cache_path(base)  # another base


def test_the_demos_are_made_cached_and_installed(tiny_dirs, tmp_path, monkeypatch, capsys):
    """The first-run path on the tiny base, through `python -m deltastore.demo`: each
    demo fine-tuned by its recipe and compressed, cached, then committed to the store;
    a second install finds them cached and overwrites nothing."""
    from deltastore.demo import DEMOS, install_demos, main
    from deltastore.format import load_delta
    from deltastore.store import DeltaStore

    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path / "cache"))
    assert main(["--base", str(tiny_dirs["base"]), "--no-progress"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(d.cache_path(tiny_dirs["base"])) for d in DEMOS]
    store = DeltaStore(tmp_path / "store")
    assert install_demos(tiny_dirs["base"], store, progress=False) == [d.name for d in DEMOS]
    for demo in DEMOS:
        delta = load_delta(store.path(demo.name))
        assert delta.meta.source == f"demo:{demo.name}" and delta.meta.rate == 0.99
        assert any(t.values.numel() for t in delta.tensors.values())
    assert install_demos(tiny_dirs["base"], store, progress=False) == []
    with pytest.raises(SystemExit):
        main(["no-such-demo", "--base", str(tiny_dirs["base"])])
    assert "unknown demo no-such-demo" in capsys.readouterr().err


def test_a_long_prompt_loses_its_start_never_the_answer(tiny_dirs):
    from deltastore.finetune import encode_all, encode_example

    tokenizer = open_model(tiny_dirs["base"]).load_tokenizer()
    cfg = FinetuneConfig(max_len=24, chat=False)
    encoded = encode_example(tokenizer, Example("x" * 100 + " question:", "42"), cfg)
    assert encoded is not None
    ids, labels = encoded
    answer = tokenizer("42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) == len(labels) == 24
    assert ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    assert set(labels[: -len(answer)]) == {-100}
    too_long = Example("q", "9" * 40)
    assert encode_example(tokenizer, too_long, cfg) is None
    assert len(encode_all(tokenizer, [too_long, Example("q", "1")], cfg)) == 1  # left out
    with pytest.raises(ValueError, match="fits max_len"):
        encode_all(tokenizer, [too_long], cfg)
