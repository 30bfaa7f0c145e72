import math

import pytest
import torch

from deltastore.calib import DEFAULT_OBJECTIVE
from deltastore.recommend import HEAVY_TAIL, LARGE_DELTA, TensorStats, delta_stats, recommend
from deltastore.sources import open_finetune, open_model


def _stats(mean_abs, top_energy=0.08):
    return [TensorStats("w", 1000, 0.0, mean_abs, mean_abs * 1.25, mean_abs * 8, 0.02, top_energy)]


def test_small_delta_gets_darex_q():
    rec = recommend(_stats(LARGE_DELTA / 10))
    assert (rec.method, rec.q_search) == ("darex-q", "unlabelled")
    assert recommend(_stats(LARGE_DELTA / 10), have_labels=True).q_search == "labelled"
    assert "SFT" in rec.reason


def test_large_heavy_tailed_delta_gets_importance_pruning_with_a_searched_rescale():
    rec = recommend(_stats(LARGE_DELTA * 3, top_energy=HEAVY_TAIL + 0.1))
    assert (rec.method, rec.q_search) == ("magnitude", "unlabelled")
    assert "heavy-tailed" in rec.reason
    heavy = _stats(LARGE_DELTA * 3, top_energy=0.5)
    assert recommend(heavy, have_labels=True).q_search == "labelled"


@pytest.mark.parametrize("top", [0.07, HEAVY_TAIL - 0.01, math.nan])
def test_large_flat_delta_stays_with_darex_q(top):
    """The study's large full fine-tunes were flat, and magnitude + q lost to DAREx-q."""
    rec = recommend(_stats(LARGE_DELTA * 3, top_energy=top))
    assert (rec.method, rec.q_objective) == ("darex-q", DEFAULT_OBJECTIVE.value)
    assert ("flat" in rec.reason) == (not math.isnan(top))
    # a labelled search has no calibration objective
    labelled = recommend(_stats(LARGE_DELTA * 3, top_energy=top), have_labels=True)
    assert labelled.q_search == "labelled"


def test_the_rate_follows_the_delta_size():
    assert recommend(_stats(1e-4)).rate == 0.999
    assert recommend(_stats(1e-3)).rate == 0.99
    assert recommend(_stats(1e-4), low_rank=True).rate == 0.99
    assert "0.999" in recommend(_stats(1e-3)).rate_reason
    assert "6-98% at 0.999" in recommend(_stats(2e-3)).rate_reason  # the large ones


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


def test_top_energy_tells_a_flat_delta_from_a_heavy_tailed_one():
    from deltastore.recommend import top_energy

    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(200_000, generator=g)
    assert top_energy(gauss) == pytest.approx(0.085, abs=0.01)  # 2(a phi(a) + Q(a)), a = 2.576
    flat = torch.sign(gauss) * 1e-3
    assert top_energy(flat) == pytest.approx(0.01, abs=1e-6)  # every entry the same size
    spiky = gauss.clone()
    spiky[:1000] *= 100  # 0.5% of the entries hold almost all of it
    assert top_energy(spiky) > 0.95  # 1e7 of 1.02e7
    assert top_energy(torch.zeros(10)) == 0.0
    assert top_energy(torch.tensor([3.0])) == 1.0  # at least one entry


def test_pooled_top_energy_weights_each_tensor_by_its_energy():
    a = TensorStats("a", 100, 0.0, 1.0, 1.0, 2.0, 1.0, top_energy=0.5)
    b = TensorStats("b", 100, 0.0, 1.0, 3.0, 6.0, 1.0, top_energy=0.1)  # 9x a's energy
    assert recommend([a, b]).top_energy == pytest.approx((0.5 * 1 + 0.1 * 9) / 10)


def test_a_large_delta_gets_one_q_per_module_type_at_either_rate():
    large = _stats(2e-3)
    rec = recommend(large)
    assert (rec.method, rec.q_groups, rec.rate) == ("darex-q", "module", 0.99)
    extreme = recommend(large, rate=0.999)
    assert (extreme.method, extreme.q_groups, extreme.rate) == ("darex-q", "module", 0.999)
    assert "given" in extreme.rate_reason and "0.999" in extreme.reason
    # ordinary deltas keep one global q
    assert recommend(_stats(2e-4), rate=0.999).q_groups == "none"


def test_recommend_cli_takes_a_rate(tiny_dirs, capsys):
    from server.cli import main

    assert main(["recommend", str(tiny_dirs["base"]), str(tiny_dirs["ft"]), "--rate", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "--rate 0.9" in out and "the largest 1%" in out
    with pytest.raises(SystemExit) as e:
        main(["recommend", str(tiny_dirs["base"]), str(tiny_dirs["ft"]), "--rate", "1.5"])
    assert e.value.code == 2
    assert "must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("rate", ["0.99", "0.999"])
def test_recommend_prints_flags_that_compress_takes(tmp_path, tiny_dirs, capsys, rate):
    from server.cli import main

    base, ft = str(tiny_dirs["base"]), str(tiny_dirs["ft"])
    assert main(["recommend", base, ft, "--rate", rate]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("recommended:"))
    flags = line.removeprefix("recommended:").split()
    out = tmp_path / "rec.delta.safetensors"
    args = ["compress", base, ft, "-o", str(out), *flags, "--calib", str(tiny_dirs["calib"])]
    assert main([*args, "--calib-tokens", "128", "--seq-len", "64"]) == 0
    assert out.is_file()
