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


def test_large_delta_gets_importance_pruning():
    rec = recommend(_stats(LARGE_DELTA * 3))
    assert rec.method == "magnitude" and rec.q_search is None
    assert "large" in rec.reason


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
