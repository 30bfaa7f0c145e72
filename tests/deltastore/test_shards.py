"""Shards written one tensor at a time: what safetensors and transformers read back."""

import pytest
import torch
from safetensors.torch import load_file

import deltastore.materialize as materialize_mod
from deltastore.compress import CompressOptions, compress
from deltastore.materialize import materialize
from deltastore.methods import Method
from deltastore.shards import INDEX, Spec, plan, write_shards
from deltastore.sources import open_finetune, open_model


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g).bfloat16(),
        "b": torch.randn(7, generator=g),
        "c": torch.randint(0, 9, (2, 2), generator=g),
        "d": torch.randn(4, 4, generator=g).half(),
    }


def test_one_file_reads_back_bit_for_bit(tmp_path):
    ts = _tensors()
    specs = [Spec(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    [path] = write_shards(tmp_path, specs, ts.__getitem__, progress=False)
    assert path.name == "model.safetensors" and not (tmp_path / INDEX).exists()
    back = load_file(str(path))
    assert back.keys() == ts.keys() and all(torch.equal(back[n], t) for n, t in ts.items())


def test_shards_and_their_index_read_as_one_model(tmp_path):
    ts = _tensors()
    specs = [Spec(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    assert [len(s) for s in plan(specs, 40)] == [1, 1, 1, 1]  # each over half of 40 bytes
    paths = write_shards(tmp_path, specs, ts.__getitem__, shard_bytes=40, progress=False)
    assert [p.name for p in paths][-1] == "model-00004-of-00004.safetensors"
    read = {}
    for p in paths:
        read |= load_file(str(p))
    assert all(torch.equal(read[n], t) for n, t in ts.items())


def test_a_tensor_unlike_its_spec_is_refused(tmp_path):
    spec = [Spec("a", (2, 2), torch.float32)]
    with pytest.raises(ValueError, match="declared"):
        write_shards(tmp_path, spec, lambda _: torch.zeros(2, 3), progress=False)


def test_materialized_shards_are_the_one_file_model(tmp_path, tiny_dirs, monkeypatch):
    base = open_model(tiny_dirs["base"])
    delta = compress(
        base,
        open_finetune(base, tiny_dirs["ft"]),
        CompressOptions(method=Method.DARE, rate=0.5, progress=False),
    )
    whole = open_model(materialize(base, delta, tmp_path / "one", progress=False))
    monkeypatch.setattr(materialize_mod, "SHARD_BYTES", 4096)
    sharded = open_model(materialize(base, delta, tmp_path / "many", progress=False))
    assert (tmp_path / "many" / INDEX).is_file() and len(sharded.files()) > 2
    assert sharded.names() == whole.names()
    assert all(torch.equal(sharded.get(n), whole.get(n)) for n in whole.names())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(sharded.load_model()(ids).logits, whole.load_model()(ids).logits)
