"""The KV cache (server/engine/kv_cache.py): static slots from a byte budget, handed out
lowest first; a slot's never-written tail is zeroed before it is read."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.kv_cache import CLEAN_CHUNK, KVCache


def _kv(budget: int, max_slots: int = 8, max_len: int = 300) -> KVCache:
    return KVCache(2, 2, 4, max_len, budget, max_slots, torch.float32, torch.device("cpu"))


def _slot_bytes(max_len: int = 300) -> int:
    return 2 * 2 * 2 * max_len * 4 * 4  # k and v, layers, kv heads, positions, head dim, fp32


def test_kv_slots_are_handed_out_lowest_first():
    kv = _kv(budget=5 * _slot_bytes() + 1, max_slots=8)
    assert kv.n_slots == 5 and kv.free == 5  # the budget, not max_slots, bounds it
    assert _kv(budget=100 * _slot_bytes(), max_slots=3).n_slots == 3
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2]
    kv.release(1)
    kv.release(0)
    assert kv.used == 1
    assert [kv.allocate() for _ in range(4)] == [0, 1, 3, 4]
    with pytest.raises(RuntimeError):
        kv.allocate()
    for slot in range(5):
        kv.release(slot)
    assert kv.free == kv.n_slots


def test_kv_budget_below_one_slot_names_the_numbers():
    budget = _slot_bytes() - 1
    with pytest.raises(ValueError) as e:
        _kv(budget=budget)
    assert str(budget) in str(e.value) and str(_slot_bytes()) in str(e.value)
    assert "300" in str(e.value)  # the positions a slot must hold


def test_kv_clean_zeroes_only_positions_never_written():
    kv = _kv(budget=3 * _slot_bytes(), max_slots=3)
    for t in kv.k + kv.v:
        t.fill_(float("nan"))  # what an uninitialized cache may hold
    slot = kv.allocate()
    written = 5
    vals = torch.arange(1.0, 1.0 + written * 2 * 4).view(written, 2, 4)  # (N, heads, dim)
    for layer in range(2):
        kv.write_(layer, torch.full((written,), slot), torch.arange(written), vals, -vals)
    kv.clean_(slot, written, upto=written + 3)
    end = min(math.ceil((written + 3) / CLEAN_CHUNK) * CLEAN_CHUNK, kv.max_len)
    for layer in range(2):
        k, v = kv.k[layer][slot], kv.v[layer][slot]  # (heads, max_len, dim)
        assert torch.equal(k[:, :written], vals.transpose(0, 1))  # the occupant's own keys
        assert torch.equal(v[:, :written], -vals.transpose(0, 1))
        assert bool((k[:, written:end] == 0).all() and (v[:, written:end] == 0).all())
    # other slots are not touched
    assert bool(kv.k[0][slot + 1].isnan().all())

    # the next occupant: what the last one wrote stays (finite), only new ground is zeroed
    kv.release(slot)
    assert kv.allocate() == slot
    kv.write_(0, torch.tensor([slot]), torch.tensor([0]), vals[:1] * 7, vals[:1] * 7)
    kv.clean_(slot, 1, upto=kv.max_len)
    k = kv.k[0][slot]
    assert torch.equal(k[:, 0], vals[0] * 7)
    assert torch.equal(k[:, 1:written], vals.transpose(0, 1)[:, 1:])  # left by the last one
    assert bool(k.isfinite().all() and (k[:, end:] == 0).all())
