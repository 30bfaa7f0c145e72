import pytest

from server.engine.cache import ByteLRU, CacheFull


def test_lru_eviction_order_and_byte_budget():
    evicted = []
    c = ByteLRU("t", budget=100, on_evict=lambda n, v: evicted.append(n))
    c.add("a", 1, 40)
    c.add("b", 2, 40)
    assert c.get("a") == 1  # a is now most recent
    c.add("c", 3, 40)  # must evict one: b is least recent
    assert evicted == ["b"] and "a" in c and "c" in c and c.used == 80
    c.add("d", 4, 100)  # needs everything
    assert evicted == ["b", "a", "c"] and c.used == 100
    assert (c.hits, c.misses, c.evictions) == (1, 0, 3)
    assert c.get("zzz") is None and c.misses == 1


def test_pinned_and_in_use_are_never_evicted():
    c = ByteLRU("t", budget=100)
    c.add("pinned", 1, 40)
    c.pin("pinned")
    c.add("busy", 2, 40)
    c.acquire("busy")
    with pytest.raises(CacheFull, match="pinned or in use"):
        c.add("new", 3, 40)
    assert [e.name for e in c.list()] == ["pinned", "busy"]
    c.release("busy")
    c.add("new", 3, 40)
    assert "busy" not in c and "pinned" in c
    c.acquire("new")
    with pytest.raises(RuntimeError, match="in use"):
        c.remove("new")


def test_too_big_and_zero_budget():
    with pytest.raises(CacheFull):
        ByteLRU("t", budget=10).add("x", 1, 11)
    with pytest.raises(CacheFull):
        ByteLRU("t", budget=0).add("x", 1, 1)
    with pytest.raises(ValueError):
        ByteLRU("t", budget=-1)


def test_replace_keeps_budget_accounting():
    c = ByteLRU("t", budget=100)
    c.add("a", 1, 60)
    c.add("a", 2, 90)  # replacing frees the old bytes first
    assert c.used == 90 and c.get("a") == 2
    assert c.can_fit(100)  # "a" could be evicted
    c.acquire("a")
    assert c.can_fit(10) and not c.can_fit(11)


def test_pin_before_add_and_unpin():
    c = ByteLRU("t", budget=50)
    c.pin("x")
    c.add("x", 1, 50)
    with pytest.raises(CacheFull):
        c.add("y", 2, 10)
    c.unpin("x")
    c.add("y", 2, 10)
    assert "x" not in c
