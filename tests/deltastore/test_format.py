import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deltastore.format import (
    Delta,
    DeltaFormatError,
    DeltaMeta,
    TensorDelta,
    decode_positions,
    encode_positions,
    load_delta,
    read_meta,
    save_delta,
)


def _delta(tensors, fp="sha256:abc"):
    meta = DeltaMeta(base_fingerprint=fp, method="dare", rate=0.9, q=0.1, seed=0)
    return Delta(meta, {t.name: t for t in tensors})


def _sparse(name="a.weight", shape=(50, 40), k=200, seed=0, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(shape[0] * shape[1], generator=g)[:k].sort().values
    vals = (torch.randn(k, generator=g) * 1e-3).bfloat16()
    return TensorDelta(name, shape, pos, vals, scale)


@pytest.mark.parametrize(
    "positions",
    [[], [0], [0, 1, 2], [254], [255], [256], [0, 255, 510, 1020, 100_000], [5, 5 + 254 * 3]],
)
def test_position_codec_round_trip(positions):
    arr = np.array(positions, dtype=np.int64)
    out = decode_positions(encode_positions(arr), len(arr), 10**6, "t")
    assert np.array_equal(out, arr)


def test_position_codec_random_and_compact():
    rng = np.random.default_rng(0)
    arr = np.flatnonzero(rng.random(2_000_000) >= 0.99)
    blob = encode_positions(arr)
    assert np.array_equal(decode_positions(blob, arr.size, 2_000_000, "t"), arr)
    assert len(blob) / arr.size < 1.1  # bytes per position at p = 0.99


def test_round_trip(tmp_path):
    sparse = _sparse()
    dense = TensorDelta.from_dense("n.weight", torch.randn(40))
    path = tmp_path / "d.safetensors"
    meta = save_delta(path, _delta([sparse, dense]))
    back = load_delta(path)
    assert back.meta == meta
    assert back.meta.tensors["a.weight"].count == 200
    assert torch.equal(back.tensors["a.weight"].positions, sparse.positions)
    assert torch.equal(back.tensors["a.weight"].values, sparse.values)
    assert back.tensors["a.weight"].scale == 10.0
    assert torch.equal(back.tensors["n.weight"].to_dense(), dense.to_dense())
    assert back.tensors["n.weight"].dense


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_round_trip_tiny_counts(tmp_path, k):
    t = TensorDelta("a.weight", (10,), torch.arange(k), torch.arange(k).float().bfloat16(), 2.0)
    save_delta(tmp_path / "d.safetensors", _delta([t]))
    back = load_delta(tmp_path / "d.safetensors").tensors["a.weight"]
    assert torch.equal(back.positions, t.positions) and torch.equal(back.values, t.values)


def test_values_overflowing_bf16_are_kept_in_fp32(tmp_path):
    t = TensorDelta("a.weight", (4,), torch.tensor([0, 3]), torch.tensor([3.4e38, -2.0]), 1.0)
    save_delta(tmp_path / "d.safetensors", _delta([t]))
    back = load_delta(tmp_path / "d.safetensors").tensors["a.weight"]
    assert back.values.dtype == torch.float32
    assert back.values.tolist() == torch.tensor([3.4e38, -2.0]).tolist()


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    save_delta(tmp_path / "d.safetensors", _delta([_sparse()]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_bytes_per_kept_entry_at_p099(tmp_path):
    g = torch.Generator().manual_seed(0)
    numel = 2_000_000
    pos = (torch.rand(numel, generator=g) >= 0.99).nonzero().reshape(-1)
    vals = torch.distributions.Laplace(0, 7e-4).sample((pos.numel(),))
    t = TensorDelta("w", (2000, 1000), pos, vals, 100.0)
    save_delta(tmp_path / "d.safetensors", _delta([t]))
    size = (tmp_path / "d.safetensors").stat().st_size
    assert size / pos.numel() < 3.0  # 1% kept -> under 1.5% of the bf16 size
    assert size < 0.015 * 2 * numel


# ---------------------------------------------------------------- bad files


def _written(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_delta(path, _delta(tensors))
    return path


def test_truncated_file(tmp_path):
    path = _written(tmp_path, [_sparse()])
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 20, 4):
        (tmp_path / "t.safetensors").write_bytes(data[:cut])
        with pytest.raises(DeltaFormatError):
            load_delta(tmp_path / "t.safetensors")


def test_corrupted_payload_byte(tmp_path):
    path = _written(tmp_path, [_sparse()])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError, match=r"checksum|corrupted"):
        load_delta(path)


def test_foreign_safetensors(tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(DeltaFormatError, match="not a deltaserve delta"):
        load_delta(tmp_path / "f.safetensors")


def test_not_safetensors_at_all(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DeltaFormatError):
        load_delta(tmp_path / "g.safetensors")


def test_bad_metadata_json(tmp_path):
    header = json.dumps({"__metadata__": {"deltaserve": "{not json"}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(DeltaFormatError, match="metadata"):
        read_meta(tmp_path / "m.safetensors")


def test_future_format_version(tmp_path):
    path = _written(tmp_path, [_sparse()])
    meta = read_meta(path).model_copy(update={"format_version": 99})
    save_file({"x": torch.zeros(1)}, str(path), metadata={"deltaserve": meta.model_dump_json()})
    with pytest.raises(DeltaFormatError, match="format version 99"):
        load_delta(path)


def test_positions_out_of_bounds(tmp_path):
    t = TensorDelta("a.weight", (10,), torch.tensor([2, 10]), torch.ones(2).bfloat16(), 1.0)
    with pytest.raises(DeltaFormatError, match="out of bounds"):
        load_delta(_written(tmp_path, [t]))


def test_duplicate_positions(tmp_path):
    t = TensorDelta("a.weight", (10,), torch.tensor([2, 2, 5]), torch.ones(3).bfloat16(), 1.0)
    with pytest.raises(DeltaFormatError, match="duplicate position 2"):
        load_delta(_written(tmp_path, [t]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, bad):
    t = TensorDelta("a.weight", (10,), torch.tensor([1, 2]), torch.tensor([1.0, bad]), 1.0)
    with pytest.raises(DeltaFormatError, match="non-finite"):
        load_delta(_written(tmp_path, [t]))


def test_non_finite_dense(tmp_path):
    t = TensorDelta.from_dense("n.weight", torch.tensor([1.0, float("nan")]))
    with pytest.raises(DeltaFormatError, match="non-finite"):
        load_delta(_written(tmp_path, [t]))


def test_missing_file(tmp_path):
    with pytest.raises(DeltaFormatError):
        load_delta(tmp_path / "nope.safetensors")


def _rewrite_header(path, edit):
    """Rewrite the file's safetensors header (its metadata) with `edit(metadata)`."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_format_1_files_are_read_and_resaved_as_format_2(tmp_path):
    path = _written(tmp_path, [_sparse()])
    want = load_delta(path)

    def as_format_1(meta):
        del meta["deltaserve_sha256"]  # format 1 had no metadata checksum
        inner = json.loads(meta["deltaserve"])
        inner["format_version"] = 1
        meta["deltaserve"] = json.dumps(inner)

    _rewrite_header(path, as_format_1)
    old = load_delta(path)
    assert old.meta.format_version == 1
    assert torch.equal(old.tensors["a.weight"].values, want.tensors["a.weight"].values)
    save_delta(path, old)
    assert read_meta(path).format_version == 2


def test_format_2_without_its_metadata_checksum_is_refused(tmp_path):
    path = _written(tmp_path, [_sparse()])
    _rewrite_header(path, lambda meta: meta.pop("deltaserve_sha256"))
    with pytest.raises(DeltaFormatError, match="metadata checksum is missing"):
        load_delta(path)
