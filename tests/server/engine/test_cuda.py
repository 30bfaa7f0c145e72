"""Engine v2 on a real GPU (marked `cuda`: skipped without one; benchmarks/gpu_check.sh
runs them): the Triton kernels against the dense reference, mixed steps of nine
variants equal to each fine-tune materialized and run by transformers on the same
device, the base bit-exact after merges, and the HTTP surface's core."""

from __future__ import annotations

import pytest
import torch

from deltastore.format import load_delta
from deltastore.materialize import materialize
from deltastore.sources import open_model
from server.engine import kernels
from server.engine.sparse import StepDeltas
from tests.server.conftest import MAX_TOKENS, PROMPTS, LiveServer, make_settings
from tests.server.engine.test_kernels import (
    N_TOKENS,
    SHAPES,
    SLOTS,
    _check_close,
    _expect_spmm,
    _segments,
    _tolerance,
    make_deltas,
    make_layouts,
)
from tests.server.engine.test_llm_engine import (
    assert_base_restored,
    assert_only_merged_layout_held,
    request,
    run,
    serving,
)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def cuda_reference(model_dir, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """Greedy text from transformers on the GPU in fp32 (the engine's numbers there)."""
    src = open_model(model_dir)
    model, tok = src.load_model().to(CUDA), src.load_tokenizer()
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(CUDA)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["w", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_spmm_equals_dense_reference(name, dtype):
    deltas = make_deltas()
    layouts = make_layouts(deltas)
    g = torch.Generator().manual_seed(1)
    out, inp = SHAPES[name]
    x = torch.randn((N_TOKENS, inp), generator=g).to(dtype)
    y0 = torch.randn((N_TOKENS, out), generator=g).to(dtype)
    segments = _segments(layouts)
    want, mag, cover, contributions = _expect_spmm(deltas, segments, name, x, y0)
    on_gpu = {n: lay.to(CUDA) for n, lay in layouts.items()}
    segs = [type(s)(s.start, s.end, on_gpu[s.layout.name], s.sign) for s in segments]
    step = StepDeltas.build(segs, CUDA)
    y = y0.to(CUDA)
    kernels.spmm_add_(y, x.to(CUDA), step.layouts, step.bases, step.items, SLOTS.index(name))
    tol = _tolerance(mag, cover, dtype, n_ops=inp + len(segments) + 3)
    _check_close(y.cpu(), want, tol, contributions)


@pytest.mark.parametrize("merge_policy", ["never", "always", "auto"])
def test_mixed_steps_match_every_finetune_on_the_gpu(
    tiny_dirs, nine_variants, tmp_path, merge_policy
):
    files, _ = nine_variants
    models: list[str | None] = [None, *files]
    with serving(
        tiny_dirs,
        files,
        tmp_path,
        device="cuda",
        max_batch_size=64,
        max_step_tokens=16,
        queue_limit=len(models) * len(PROMPTS),
        merge_policy=merge_policy,
        delta_kernel="native",
    ) as srv:
        reqs = [request(srv.engine, m, p) for p in PROMPTS for m in models]
        run(srv, reqs)
    mats: dict[str | None, object] = {}
    base = open_model(tiny_dirs["base"])
    for name, path in files.items():
        mats[name] = materialize(base, load_delta(path), tmp_path / f"mat-{name}", progress=False)
    mats[None] = tiny_dirs["base"]
    for r in reqs:
        assert r.outcome == "done", r.events[-1]
        assert r.job.text == cuda_reference(mats[r.variant], r.prompt), (r.variant, r.prompt)
    assert srv.engine.device.type == "cuda" and srv.scheduler.native
    assert_only_merged_layout_held(srv.engine)
    assert_base_restored(srv.engine, tiny_dirs["base"])


def test_the_http_core_on_the_gpu(tiny_dirs, variant_files, materialized, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for name, path in variant_files.items():
        (store / f"{name}.delta.safetensors").write_bytes(path.read_bytes())
    srv = LiveServer(make_settings(tiny_dirs["base"], store, device="cuda"))
    srv.wait_ready()
    try:
        for name in ["v0", "v1", None]:
            model = name or tiny_dirs["base"].name
            body = {
                "model": model,
                "prompt": PROMPTS[0],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            r = srv.client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == cuda_reference(materialized[name], PROMPTS[0])
        seeded = {
            "model": "v2",
            "prompt": PROMPTS[1],
            "max_tokens": 8,
            "temperature": 0.9,
            "seed": 3,
        }
        a = srv.client.post("/v1/completions", json={**seeded, "logprobs": 2}).json()
        b = srv.client.post("/v1/completions", json=seeded).json()
        assert a["choices"][0]["text"] == b["choices"][0]["text"]  # a seed repeats on the GPU
        assert len(a["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    finally:
        srv.stop()
