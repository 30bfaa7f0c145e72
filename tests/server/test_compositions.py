"""Compositions served per request: "a+b", weights, registered recipes (sum, ties,
dare-merge). Greedy output equals `deltaserve merge` + `materialize` loaded in
transformers; a+b equals b+a; a weight of 0 leaves the member out; bad ones are
clear 400/404s."""

from __future__ import annotations

import pytest

from deltastore.format import load_delta, save_delta
from deltastore.materialize import materialize
from deltastore.sources import open_model
from server.cli import main
from server.compose import CompositionError, parse
from tests.server.conftest import MAX_TOKENS, PROMPTS, reference_text

PROMPT = PROMPTS[0]


def _text(live, model, prompt=PROMPT):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = live.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _merged_reference(tiny_dirs, variant_files, tmp_path, names, *extra):
    """Greedy text of the offline merge, materialized and loaded in transformers."""
    out = tmp_path / f"{'-'.join(names)}-{len(extra)}.delta.safetensors"
    files = [str(variant_files[n]) for n in names]
    assert main(["merge", str(tiny_dirs["base"]), *files, "-o", str(out), *extra]) == 0
    hf = materialize(open_model(tiny_dirs["base"]), load_delta(out), out.with_suffix(".hf"))
    return {p: reference_text(hf, p) for p in PROMPTS[:2]}


def test_parse_gives_one_canonical_name():
    assert parse("v1+v0", 4).key == parse("v0+v1", 4).key == "v0+v1"
    assert parse("0.3*b+0.7*a", 4).key == "0.7*a+0.3*b"
    assert parse("a+0*b", 4).key == "a"  # a weight of 0 leaves the member out
    assert parse("a+a", 4).key == "2.0*a"
    assert parse("a+-0.5*b", 4).members == (("a", 1.0), ("b", -0.5))
    for bad in ("a+", "+a", "a**b", "0.5*", "a+b+c", "../x+a", "0*a", "inf*a+b"):
        with pytest.raises(CompositionError):
            parse(bad, 2)


def test_sum_compositions_match_the_offline_merge(
    live, tiny_dirs, variant_files, references, tmp_path
):
    want = _merged_reference(tiny_dirs, variant_files, tmp_path, ["v0", "v1"])
    for model in ("v0+v1", "v1+v0"):
        for p in PROMPTS[:2]:
            assert _text(live, model, p) == want[p], (model, p)
    weighted = _merged_reference(
        tiny_dirs, variant_files, tmp_path, ["v2", "v3"], "--weights", "0.7,0.3"
    )
    assert _text(live, "0.7*v2+0.3*v3") == weighted[PROMPT]
    assert _text(live, "0.3*v3+0.7*v2") == weighted[PROMPT]
    assert _text(live, "v4+0*v1") == _text(live, "v4")
    # compositions share steps with plain variants, which keep their own weights
    assert want[PROMPT] not in (references["v0"][PROMPT], references["v1"][PROMPT])
    assert _text(live, "v0") == references["v0"][PROMPT]
    assert _text(live, "v1") == references["v1"][PROMPT]


@pytest.mark.parametrize("method", ["ties", "dare-merge"])
def test_registered_recipes_match_the_offline_merge(
    live, tiny_dirs, variant_files, tmp_path, method
):
    body = {
        "name": f"mix-{method}",
        "members": ["v0", "v2"],
        "weights": [0.6, 0.4],
        "method": method,
        "seed": 5,
    }
    r = live.admin.post("/admin/compositions", json=body)
    assert r.status_code == 201, r.text
    extra = ["--method", method, "--weights", "0.6,0.4", "--seed", "5"]
    want = _merged_reference(tiny_dirs, variant_files, tmp_path, ["v0", "v2"], *extra)
    assert _text(live, f"mix-{method}") == want[PROMPT]
    cards = {m["id"]: m for m in live.client.get("/v1/models").json()["data"]}
    comp = cards[f"mix-{method}"]["composition"]
    assert comp["method"] == method and [m["name"] for m in comp["members"]] == ["v0", "v2"]
    one = live.client.get(f"/v1/models/mix-{method}").json()
    assert one["composition"]["members"][1]["weight"] == 0.4
    assert live.admin.post("/admin/compositions", json=body).status_code == 409
    assert live.admin.delete(f"/admin/compositions/mix-{method}").status_code == 200
    r = live.client.post("/v1/completions", json={"model": f"mix-{method}", "prompt": "a"})
    assert r.status_code == 404


def test_bad_compositions_are_clear(live, variant_files):
    def status(model):
        r = live.client.post("/v1/completions", json={"model": model, "prompt": "a"})
        return r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]

    assert status("v0+")[:2] == (400, "invalid_composition")
    code, kind, msg = status("v0+nope")
    assert (code, kind) == (404, "model_not_found") and "'nope'" in msg
    assert status("v0+v1+v2+v3+v4")[:2] == (400, "invalid_composition")  # limit 4
    alien = load_delta(variant_files["v3"])
    alien = type(alien)(alien.meta.model_copy(update={"base_fingerprint": "other"}), alien.tensors)
    save_delta(live.state.store.path("alien"), alien)
    code, kind, msg = status("v0+alien")
    assert (code, kind) == (400, "invalid_composition") and "another base" in msg
    # a name is a delta or a recipe, never both
    recipe = {"name": "v0", "members": ["v1", "v2"]}
    assert live.admin.post("/admin/compositions", json=recipe).status_code == 409
    recipe = {"name": "mix", "members": ["v1", "nope"]}
    assert live.admin.post("/admin/compositions", json=recipe).status_code == 404
    recipe = {"name": "mix", "members": ["v1", "v2"], "weights": [1.0]}
    assert live.admin.post("/admin/compositions", json=recipe).status_code == 400
    recipe = {"name": "mix", "members": ["v1", "v2"], "method": "average"}
    assert live.admin.post("/admin/compositions", json=recipe).status_code == 400
    assert (
        live.admin.post(
            "/admin/compositions", json={"name": "mix", "members": ["v1", "v2"]}
        ).status_code
        == 201
    )
    r = live.admin.post(
        "/admin/deltas", params={"name": "mix"}, content=variant_files["v0"].read_bytes()
    )
    assert r.status_code == 409
    assert live.admin.delete("/admin/compositions/nope").status_code == 404


def test_review_edge_cases(live, variant_files):
    """Keys parse back to themselves; long or odd input is refused fast; an expression
    has a model card; a recipe in use can be deleted; the base name is not a recipe."""
    import time

    for expr in ("123456.7*v0+v1", "0.1234567*v0+v1", "1e-7*v0+v1"):
        comp = parse(expr, 4)
        assert parse(comp.key, 4) == comp
    t0 = time.perf_counter()
    for bad in ("1" * 100_000 + "x+v0", "nan*v0+v1", "1e9*v0+v1", "1" * 900 + "*v0+v1"):
        with pytest.raises(CompositionError):
            parse(bad, 4)
    assert time.perf_counter() - t0 < 1.0
    card = live.client.get("/v1/models/v0+v1")
    assert card.status_code == 200 and card.json()["composition"]["method"] == "sum"
    base = {"name": live.state.base_name, "members": ["v0", "v1"]}
    assert live.admin.post("/admin/compositions", json=base).status_code == 409
    body = '{"name": "mix", "members": ["v0", "v1"], "weights": [1, Infinity]}'
    r = live.admin.post(
        "/admin/compositions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
