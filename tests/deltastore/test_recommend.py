import pytest

from deltastore.recommend import LARGE_DELTA, TensorStats, delta_stats, recommend
from deltastore.sources import open_finetune, open_model


def _stats(mean_abs):
    return [TensorStats("w", 1000, 0.0, mean_abs, mean_abs * 1.25, mean_abs * 8, 0.02)]


def test_small_delta_gets_darex_q():
    rec = recommend(_stats(LARGE_DELTA / 10))
    assert (rec.method, rec.q_search) == ("darex-q", "unlabelled")
    assert recommend(_stats(LARGE_DELTA / 10), have_labels=True).q_search == "labelled"
    assert "SFT" in rec.reason


def test_large_delta_gets_importance_pruning_with_a_searched_rescale():
    rec = recommend(_stats(LARGE_DELTA * 3))
    assert (rec.method, rec.q_search) == ("magnitude", "unlabelled")
    assert "large" in rec.reason
    assert recommend(_stats(LARGE_DELTA * 3), have_labels=True).q_search == "labelled"


def test_the_rate_follows_the_delta_size():
    assert recommend(_stats(1e-4)).rate == 0.999
    assert recommend(_stats(1e-3)).rate == 0.99
    assert recommend(_stats(1e-4), low_rank=True).rate == 0.99
    assert "0.999" in recommend(_stats(1e-3)).rate_reason


def test_lora_delta_gets_magnitude_with_q_whatever_its_size():
    rec = recommend(_stats(LARGE_DELTA / 10), low_rank=True)
    assert (rec.method, rec.q_search) == ("magnitude", "unlabelled")
    assert "LoRA" in rec.reason


def test_recommend_cli_knows_a_lora_adapter(tmp_path, tiny_dirs, capsys):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from server.cli import main

    model = open_model(tiny_dirs["base"]).load_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)  # PEFT starts B at zero: make the delta non-zero
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["recommend", str(tiny_dirs["base"]), str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "recommended: --method magnitude --q-search unlabelled" in out


def test_pooled_statistics():
    stats = [
        TensorStats("a", 100, 1.0, 1.0, 0.0, 1.0, 1.0),
        TensorStats("b", 100, -1.0, 1.0, 0.0, 1.0, 1.0),
    ]
    rec = recommend(stats)
    assert rec.mean_abs == pytest.approx(1.0)
    assert rec.std == pytest.approx(1.0)  # half +1, half -1


def test_on_a_real_pair(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    stats = delta_stats(open_finetune(base, tiny_dirs["ft"]), progress=False)
    assert len(stats) == len(base.names())
    rec = recommend(stats)
    assert 0 < rec.mean_abs < rec.max_abs
    with pytest.raises(ValueError, match="does not change"):
        recommend([])
