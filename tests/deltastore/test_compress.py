import math

import pytest
import torch

from deltastore.apply import FlatWeights, apply_delta_, bind
from deltastore.calib import Objective, collect, load_calibration, objectives
from deltastore.compress import CompressOptions, compress
from deltastore.format import load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.methods import Method, mix_sample_rate
from deltastore.qsearch import (
    QGrid,
    QGroups,
    QSearch,
    RowStats,
    SearchTrace,
    coarse_to_fine,
    layer_q,
    phi,
    q_grid,
    refine_groups,
    search_q,
    tensor_groups,
)
from deltastore.sources import fingerprint, open_finetune, open_model


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    return base, open_finetune(base, tiny_dirs["ft"])


def _opts(tiny_dirs, **kw):
    kw.setdefault("calib", tiny_dirs["calib"])
    kw.setdefault("val", tiny_dirs["val"])
    return CompressOptions(progress=False, calib_tokens=256, seq_len=64, **kw)


@pytest.mark.parametrize("method", list(Method))
def test_every_method_compresses_and_records(pair, tiny_dirs, method):
    base, ft = pair
    q = 0.3 if method is Method.DAREX_Q else None
    delta = compress(base, ft, _opts(tiny_dirs, method=method, rate=0.9, q=q))
    meta = delta.meta
    assert meta.method == method.value and meta.rate == 0.9
    assert meta.base_fingerprint == fingerprint(base)
    assert meta.policy["dense_tensors"] == 5  # 2 layers x 2 norms + final norm
    for t in delta.tensors.values():
        assert t.dense == (len(t.shape) < 2)
        if not t.dense:
            assert t.values.dtype == torch.bfloat16  # what the file stores
    sparse = [t for t in delta.tensors.values() if not t.dense]
    kept = sum(t.count for t in sparse) / sum(t.numel for t in sparse)
    assert 0.05 < kept < 0.15


def test_dense_pattern_policy(pair, tiny_dirs):
    base, ft = pair
    opts = _opts(tiny_dirs, method=Method.DARE, rate=0.9, dense_patterns=(r"embed_tokens",))
    delta = compress(base, ft, opts)
    assert delta.tensors["model.embed_tokens.weight"].dense
    assert delta.meta.policy["dense_patterns"] == ["embed_tokens"]


def test_option_validation(tiny_dirs):
    with pytest.raises(ValueError, match="darex-q needs"):
        _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9)
    with pytest.raises(ValueError, match="dare rescales"):
        _opts(tiny_dirs, method=Method.DARE, rate=0.9, q=0.5)
    with pytest.raises(ValueError, match="q must be"):
        _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q=0.0)
    with pytest.raises(ValueError, match="--val"):
        CompressOptions(method=Method.DAREX_Q, rate=0.9, q_search=QSearch.LABELLED)
    with pytest.raises(ValueError, match="--calib"):
        CompressOptions(method=Method.WANDA, rate=0.9)
    with pytest.raises(ValueError, match="search dtype"):
        _opts(tiny_dirs, method=Method.DARE, rate=0.9, search_dtype="int8")
    with pytest.raises(ValueError, match="pattern"):
        _opts(tiny_dirs, method=Method.DARE, rate=0.9, dense_patterns=("(",))


@pytest.mark.parametrize(
    ("how", "dtype"),
    [
        (QSearch.UNLABELLED, "float32"),
        (QSearch.LABELLED, "float32"),
        (QSearch.UNLABELLED, "bfloat16"),
    ],
)
def test_global_q_search(pair, tiny_dirs, how, dtype):
    base, ft = pair
    opts = _opts(
        tiny_dirs, method=Method.DAREX_Q, rate=0.9, q_search=how, q_step=0.1, search_dtype=dtype
    )
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    assert rec is not None and rec["mode"] == how.value
    assert len(rec["grid"]) == len(rec["values"]) >= 4
    assert all(0.1 - 1e-9 <= q <= 1.0 for q in rec["grid"])
    pick = min if rec["minimise"] else max
    assert rec["best_value"] == pick(rec["values"])
    assert math.isclose(delta.meta.q, rec["best"])
    for t in delta.tensors.values():
        if not t.dense:
            assert math.isclose(t.scale, 1 / rec["best"])


def test_analytical_q_is_per_layer(pair, tiny_dirs):
    base, ft = pair
    opts = _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q_search=QSearch.ANALYTICAL)
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    assert rec["mode"] == "analytical" and rec["parameter"] == "eta"
    qs = rec["layer_q"]
    assert set(qs) == {n for n, t in delta.tensors.items() if not t.dense}
    assert all(0.1 - 1e-9 <= q <= 0.998 for q in qs.values())
    for name, q in qs.items():
        assert math.isclose(delta.tensors[name].scale, 1 / q)


def test_coarse_to_fine_finds_the_minimum_and_stops_early_only_when_asked():
    calls = []

    def f(q):
        calls.append(q)
        return (q - 0.237) ** 2

    trace = SearchTrace("q", "sq", minimise=True)
    best = coarse_to_fine(f, 0.01, 1.0, 0.05, trace, progress=False, patience=3)
    assert abs(best - 0.237) <= 0.005 + 1e-9
    # coarse: 0.01 .. 0.26 improve, then 3 misses -> stop long before 1.0
    assert max(calls) < 0.5
    assert len(set(calls)) == len(calls)  # nothing evaluated twice
    calls.clear()
    full = SearchTrace("q", "sq", minimise=True)
    assert coarse_to_fine(f, 0.01, 1.0, 0.05, full, progress=False) == best
    assert max(calls) >= 0.96  # the default covers the whole range
    assert full.as_dict()["evaluations"] == len(calls) and full.seconds > 0


def test_a_search_reports_every_evaluation_and_the_best_so_far(caplog, capsys):
    """Never silent: a bar with its total and the best value so far on a terminal,
    one log line per evaluation elsewhere."""
    import logging
    import re

    def f(q):
        return abs(math.sin(9 * q)) + q  # several dips

    trace = SearchTrace("q", "obj", minimise=True)
    with caplog.at_level(logging.INFO, logger="deltastore.qsearch"):
        coarse_to_fine(f, 0.01, 1.0, 0.05, trace, progress=False)
    lines = [r.getMessage() for r in caplog.records if "evaluations" in r.getMessage()]
    assert len(lines) == len(trace.points)
    running = math.inf
    for line, (_, value) in zip(lines, trace.points, strict=True):
        n, total = (int(x) for x in re.search(r"(\d+)/(\d+) evaluations", line).groups())
        assert n <= total
        running = min(running, value)
        best = float(re.search(r"best q=\S+ obj=(\S+)", line).group(1))
        assert math.isclose(best, running, rel_tol=1e-3)
    coarse_to_fine(f, 0.01, 1.0, 0.05, SearchTrace("q", "obj", minimise=True), progress=True)
    bar = capsys.readouterr().err
    assert "search q" in bar and "best q=" in bar and f"/{n_points(0.01, 1.0, 0.05)}" in bar


def n_points(lo, hi, step):
    return math.floor((hi - lo) / step + 1e-9) + 1 + 2 * 9


def test_the_search_cannot_stop_in_a_local_dip():
    """The large-delta case: the objective dips at 2(1-p), rises for several steps,
    and has its global minimum near 30(1-p). A walk that stops after 3
    non-improvements keeps 2(1-p); the whole-range search finds 30(1-p)."""
    rate = 0.999

    def f(q):
        x = math.log2(q / 0.001)
        return min(18.0 + 2 * abs(x - 1), 10.0 + 4 * abs(x - math.log2(30)))

    early = SearchTrace("q", "mse", minimise=True)
    coarse_to_fine(
        lambda x: f(0.001 * 2**x),
        0.0,
        math.log2(1000),
        0.5,
        early,
        progress=False,
        fine=(4, 3),
        shown=lambda x: 0.001 * 2**x,
        patience=3,
    )
    assert early.best[0] < 0.005  # the local dip
    trace = SearchTrace("q", "mse", minimise=True)
    q = search_q(f, rate, 1.0, 0.05, QGrid.LOG, trace, progress=False)
    assert abs(math.log2(q / 0.03)) <= 0.125
    assert len(trace.points) <= 30  # the whole log range: about 26 evaluations


def test_log_grid_resolves_small_multiples_of_one_minus_p():
    """At p = 0.999 the best q here is 2.6 x (1-p): the linear grid's fine pass (step
    0.005 from 0.001) cannot get near it, the log grid lands within its 1/8 step."""
    rate, target = 0.999, 0.0026

    def f(q):
        return (math.log(q) - math.log(target)) ** 2

    lin = SearchTrace("q", "sq", minimise=True)
    log = SearchTrace("q", "sq", minimise=True)
    q_lin = search_q(f, rate, 1.0, 0.05, QGrid.LINEAR, lin, progress=False)
    q_log = search_q(f, rate, 1.0, 0.05, QGrid.LOG, log, progress=False)
    assert abs(math.log2(q_log / target)) <= 0.125 / 2 + 1e-6
    assert abs(math.log2(q_lin / target)) > 0.5  # 0.001 or 0.006: both far off
    assert all(0.001 - 1e-12 <= q <= 1.0 for q, _ in log.points)
    assert len(log.points) <= len(lin.points)  # and no more evaluations
    assert dict(log.points)[q_log] == log.best[1]


@pytest.mark.parametrize("grid", [QGrid.LOG, QGrid.LINEAR])
def test_downward_search_finds_a_peak_behind_a_flat_start(grid):
    """Like a labelled search over a magnitude mask: accuracy is 0 for small q (a
    huge rescale), peaks near q = 0.35. Both directions find the peak."""

    def accuracy(q):
        return max(0.0, 1.0 - 0.5 * abs(math.log2(q / 0.35)))  # 0.24 at q = 1

    up = SearchTrace("q", "acc", minimise=False)
    down = SearchTrace("q", "acc", minimise=False)
    q_up = search_q(accuracy, 0.99, 1.0, 0.05, grid, up, progress=False)
    q_down = search_q(accuracy, 0.99, 1.0, 0.05, grid, down, progress=False, downward=True)
    assert accuracy(q_down) > 0.9
    assert accuracy(q_up) > 0.9  # the whole range: the flat start cannot stop it
    assert down.points[0][0] == 1.0 and up.points[0][0] == 0.01
    assert all(0.01 - 1e-12 <= q <= 1.0 for q, _ in down.points)


def test_importance_masks_search_q_downward(pair, tiny_dirs):
    base, ft = pair
    opts = _opts(tiny_dirs, method=Method.MAGNITUDE, rate=0.9, q_search=QSearch.UNLABELLED)
    rec = compress(base, ft, opts).meta.q_search
    assert rec["direction"] == "down" and rec["grid"][0] == 1.0
    opts = _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q_search=QSearch.UNLABELLED)
    rec = compress(base, ft, opts).meta.q_search
    assert rec["direction"] == "up" and rec["grid"][0] == pytest.approx(0.1)


def test_log_grid_search_through_compress(pair, tiny_dirs):
    base, ft = pair
    opts = _opts(
        tiny_dirs,
        method=Method.DAREX_Q,
        rate=0.9,
        q_search=QSearch.UNLABELLED,
        q_grid=QGrid.LOG,
    )
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    assert rec["q_grid"] == "log"
    assert all(0.1 - 1e-9 <= q <= 1.0 for q in rec["grid"])
    assert 0.1 - 1e-9 <= delta.meta.q <= 1.0 and delta.meta.q == rec["best"]


def test_phi_and_q_grid():
    assert phi(0.5) == 0.5
    assert math.isclose(phi(0.4999999), 0.5, rel_tol=1e-3)
    assert phi(0.99) > 0
    g = q_grid(0.99)
    assert math.isclose(float(g[0]), 0.01) and math.isclose(float(g[-1]), 0.998)


def test_layer_q_in_range_and_sensitive_to_eta():
    g = torch.Generator().manual_seed(0)
    s1 = torch.randn(64, generator=g, dtype=torch.float64) * 1e-2
    s2 = s1.abs() * 1e-2
    grid = q_grid(0.9)
    qs = {eta: layer_q(RowStats(s1, s2), 0.9, eta, grid) for eta in (-1e4, -10.0, 10.0, 1e4)}
    assert all(0.1 <= q <= 0.998 for q in qs.values())
    assert len(set(qs.values())) > 1


def test_materialize_equals_base_plus_delta(tmp_path, pair, tiny_dirs):
    base, ft = pair
    delta = compress(base, ft, _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q=0.4))
    save_delta(tmp_path / "d.safetensors", delta)
    loaded = load_delta(tmp_path / "d.safetensors")
    out = materialize(base, loaded, tmp_path / "mat", progress=False)
    mat = open_model(out).load_model()
    # the same model built directly: the base with the delta applied in place
    direct = base.load_model()
    weights = FlatWeights.from_module(direct, fingerprint=fingerprint(base))
    apply_delta_(weights, bind(loaded, weights))
    for (n, a), (_, b) in zip(mat.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(mat(x).logits, direct(x).logits)
    with pytest.raises(FileExistsError):
        materialize(base, loaded, tmp_path / "mat", progress=False)


def test_lora_compresses(tmp_path, tiny_dirs):
    from peft import LoraConfig, get_peft_model

    base = open_model(tiny_dirs["base"])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(base.load_model(), cfg).save_pretrained(tmp_path / "adapter")
    delta = compress(
        base,
        open_finetune(base, tmp_path / "adapter"),
        _opts(tiny_dirs, method=Method.DARE, rate=0.5),
    )
    assert sorted(delta.tensors) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    assert delta.meta.policy["unchanged_tensors"] == len(base.names()) - 2


def test_identical_finetune_is_an_error(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    with pytest.raises(ValueError, match="identical"):
        compress(
            base,
            open_finetune(base, tiny_dirs["base"]),
            _opts(tiny_dirs, method=Method.DARE, rate=0.5),
        )


def _dense_delta(ft, name):
    return dict(ft.deltas())[name].reshape(-1)


@pytest.mark.parametrize("search", [None, QSearch.UNLABELLED])
def test_mix_stores_its_top_entries_exactly_whatever_q(pair, tiny_dirs, search):
    base, ft = pair
    opts = _opts(tiny_dirs, method=Method.MIX, rate=0.9, q_search=search, q_grid=QGrid.LOG)
    delta = compress(base, ft, opts)
    q = delta.meta.q
    assert delta.meta.mix_top == 0.5
    if search is None:
        assert q == pytest.approx(mix_sample_rate(0.9, 0.5))
    else:
        assert delta.meta.q_search["grid"][0] == pytest.approx(mix_sample_rate(0.9, 0.5), abs=1e-6)
    name = "model.layers.0.mlp.down_proj.weight"
    t = delta.tensors[name]
    full = _dense_delta(ft, name)
    applied = t.to_dense().reshape(-1)[t.positions]
    raw = full[t.positions]
    n_top = round(0.5 * 0.1 * full.numel())
    top = torch.topk(full.abs(), n_top).indices
    is_top = torch.isin(t.positions, top)
    assert int(is_top.sum()) == n_top
    tol = dict(rtol=2**-7, atol=0)  # bf16 storage
    torch.testing.assert_close(applied[is_top], raw[is_top], **tol)
    torch.testing.assert_close(applied[~is_top], raw[~is_top] / q, **tol)


def test_mix_search_scores_the_delta_it_stores(pair, tiny_dirs):
    """The objective the search reports for its chosen q is the one the stored file
    gives: the trial and the file fold the top entries the same way."""
    base, ft = pair
    opts = _opts(tiny_dirs, method=Method.MIX, rate=0.9, q_search=QSearch.UNLABELLED)
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    tokenizer = base.load_tokenizer()
    ids = load_calibration(tiny_dirs["calib"], tokenizer, 256, 64)
    ref, _ = collect(ft.load_model(torch.float32), ids)
    model = base.load_model(torch.float32)
    weights = FlatWeights.from_module(model)
    apply_delta_(weights, bind(delta, weights))
    assert rec["objective"] == "kl"  # the default's, on a text with no chat prompt
    kl = objectives(model, ids, ref, (Objective.KL,))[Objective.KL]
    assert kl == pytest.approx(rec["best_value"], rel=0.02)


def test_per_group_q_refines_the_global_one(pair, tiny_dirs):
    base, ft = pair
    opts = _opts(
        tiny_dirs,
        method=Method.DAREX_Q,
        rate=0.9,
        q_search=QSearch.UNLABELLED,
        q_groups=QGroups.MODULE,
    )
    delta = compress(base, ft, opts)
    rec = delta.meta.q_search
    groups = rec["groups"]
    assert groups["by"] == "module"
    assert set(groups["q"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "embed_tokens",
    }  # fmt: skip
    assert groups["best_value"] <= rec["best_value"]  # starts from the global q
    assert groups["values"][0] == pytest.approx(rec["best_value"])
    assert groups["evaluations"] == len(groups["values"]) - 1 >= 8
    for name, t in delta.tensors.items():
        if not t.dense:
            key = "embed_tokens" if "embed" in name else name.split("layers.")[1].split(".", 1)[1]
            assert t.scale == pytest.approx(1 / groups["q"][key.removesuffix(".weight")])
    if len(set(groups["q"].values())) > 1:
        assert delta.meta.q is None


def test_group_options_are_checked(tiny_dirs):
    with pytest.raises(ValueError, match="q-groups"):
        _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q=0.2, q_groups=QGroups.DEPTH)
    with pytest.raises(ValueError, match="top share"):
        _opts(tiny_dirs, method=Method.MIX, rate=0.9, mix_top=1.5)
    with pytest.raises(ValueError, match="applies to --method mix"):
        _opts(tiny_dirs, method=Method.DARE, rate=0.9, mix_top=0.3)
    kl = Objective.LOGIT_MSE  # any objective but the default
    with pytest.raises(ValueError, match="unlabelled q search"):
        _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q=0.2, q_objective=kl)
    with pytest.raises(ValueError, match="unlabelled q search"):
        _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q_search=QSearch.LABELLED, q_objective=kl)
    with pytest.raises(ValueError, match="mix takes"):
        _opts(tiny_dirs, method=Method.MIX, rate=0.9, q_search=QSearch.ANALYTICAL)
    # the analytical q's eta search on text takes it
    _opts(tiny_dirs, method=Method.DAREX_Q, rate=0.9, q_search=QSearch.ANALYTICAL, q_objective=kl)


def test_tensor_groups_by_module_and_depth():
    names = [
        f"model.layers.{i}.{m}.weight"
        for i in range(10)
        for m in ("self_attn.q_proj", "mlp.up_proj")
    ]
    names.append("model.embed_tokens.weight")
    by_module = tensor_groups(names, QGroups.MODULE)
    assert set(by_module) == {"self_attn.q_proj", "mlp.up_proj", "embed_tokens"}
    assert len(by_module["mlp.up_proj"]) == 10
    by_depth = tensor_groups(names, QGroups.DEPTH)
    assert list(by_depth) == [
        "layers 0-2",
        "layers 3-5",
        "layers 6-8",
        "layers 9-11",
        "outside the layers",
    ]
    assert by_depth["layers 9-11"] == [
        "model.layers.9.self_attn.q_proj.weight",
        "model.layers.9.mlp.up_proj.weight",
    ]
    assert sum(map(len, by_depth.values())) == len(names)


def test_refine_groups_finds_each_groups_optimum():
    groups = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}
    target = {"a": 0.04, "b": 0.01, "c": 0.02}  # from 0.02: a x2, b x0.5, c stays

    def f(per_tensor):
        return sum(
            (math.log2(per_tensor[names[0]] / target[g])) ** 2 for g, names in groups.items()
        )

    trace = SearchTrace("evaluation", "f", minimise=True)
    got = refine_groups(f, groups, 0.02, 0.005, 1.0, trace, progress=False)
    assert got == pytest.approx(target)
    assert trace.best[1] == pytest.approx(0.0)
    # the lower bound holds: b cannot go below lo
    got = refine_groups(f, groups, 0.02, 0.015, 1.0, SearchTrace("e", "f", True), progress=False)
    assert got["b"] == pytest.approx(0.015)


def test_multiples_grid_is_the_papers_recipe():
    seen = []

    def f(q):
        seen.append(q)
        return abs(q - 0.0137)

    trace = SearchTrace("q", "f", minimise=True)
    q = search_q(f, 0.999, 1.0, 0.05, QGrid.MULTIPLES, trace, progress=False)
    assert seen == pytest.approx([k * 0.001 for k in range(1, 31)])
    assert q == pytest.approx(0.014)
    seen.clear()
    search_q(f, 0.99, 0.2, 0.05, QGrid.MULTIPLES, SearchTrace("q", "f", True), progress=False)
    assert max(seen) == pytest.approx(0.2)  # capped by q_max
