"""Streamed weights (`compress --stream-weights`): the same model, the same search,
the same file as the resident path, with the weights left in their files."""

import pytest
import torch

from deltastore.compress import CompressOptions, compress
from deltastore.format import Delta
from deltastore.methods import Method
from deltastore.qsearch import QSearch
from deltastore.sources import open_finetune, open_model
from deltastore.streamed import streamed
from deltastore.testing import make_model, perturbed, save


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    base = open_model(tiny_dirs["base"])
    return base, open_finetune(base, tiny_dirs["ft"])


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 1], [9, 8, 7, 6, 5, 4, 3, 2]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_a_streamed_model_computes_what_the_loaded_one_does(tmp_path, dtype, tied):
    src = open_model(save(make_model(3, tie_word_embeddings=tied), tmp_path / "m"))
    want = src.load_model(dtype)(input_ids=IDS).logits
    model = streamed(src, dtype)
    got = model(input_ids=IDS).logits
    assert torch.equal(got, want)
    # between forwards no weight is held: every parameter but the anchor is on meta
    held = [n for n, p in model.named_parameters() if p.device.type != "meta" and p.numel()]
    assert held == []


def test_a_streamed_finetune_is_the_finetuned_model(pair):
    _, ft = pair
    want = ft.load_model(torch.float32)(input_ids=IDS).logits
    assert torch.equal(streamed(ft, torch.float32)(input_ids=IDS).logits, want)


def test_a_streamed_model_generates_as_the_loaded_one(pair):
    base, _ = pair
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 257}
    want = base.load_model(torch.float32).generate(input_ids=IDS[:1], **kw)
    assert torch.equal(streamed(base, torch.float32).generate(input_ids=IDS[:1], **kw), want)


def _timeless(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {
        k: _timeless(v) if isinstance(v, dict) else v for k, v in record.items() if k != "seconds"
    }


def _same(a: Delta, b: Delta) -> None:
    assert a.meta.q == b.meta.q
    assert _timeless(a.meta.q_search) == _timeless(b.meta.q_search)  # every point, same value
    assert a.meta.fidelity == b.meta.fidelity
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert t.scale == u.scale and t.dense == u.dense
        assert torch.equal(t.positions, u.positions) and torch.equal(t.values, u.values)


def _opts(tiny_dirs, **kw):
    kw.setdefault("calib", tiny_dirs["calib"])
    kw.setdefault("val", tiny_dirs["val"])
    return CompressOptions(progress=False, calib_tokens=256, seq_len=64, **kw)


@pytest.mark.parametrize(
    ("method", "how", "dtype", "calib"),
    [
        (Method.DAREX_Q, QSearch.UNLABELLED, "float32", "calib"),
        (Method.DAREX_Q, QSearch.UNLABELLED, "bfloat16", "chat_calib"),  # + the estimate
        (Method.DAREX_Q, QSearch.ANALYTICAL, "float32", "calib"),
        (Method.DAREX_Q, QSearch.LABELLED, "float32", "calib"),  # generates
        (Method.MIX, QSearch.UNLABELLED, "float32", "calib"),  # values folded per trial
        (Method.WANDA, None, "float32", "calib"),  # input norms from the calibration
    ],
)
def test_streamed_compress_writes_the_resident_one(pair, tiny_dirs, method, how, dtype, calib):
    base, ft = pair
    kw = dict(method=method, rate=0.9, q_search=how, search_dtype=dtype, calib=tiny_dirs[calib])
    resident = compress(base, ft, _opts(tiny_dirs, **kw))
    streamed_ = compress(base, ft, _opts(tiny_dirs, stream_weights=True, **kw))
    _same(resident, streamed_)
    if calib == "chat_calib":
        assert resident.meta.fidelity is not None


def test_a_streamed_lora_is_the_densified_adapter(tmp_path, tiny_dirs):
    peft = pytest.importorskip("peft")
    base_model = make_model(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    lora = peft.get_peft_model(perturbed(base_model, 0.0, 0), cfg)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter")
    base = open_model(tiny_dirs["base"])
    ft = open_finetune(base, tmp_path / "adapter")
    want = ft.load_model(torch.bfloat16)(input_ids=IDS).logits
    assert torch.equal(streamed(ft, torch.bfloat16)(input_ids=IDS).logits, want)
