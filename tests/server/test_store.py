import pytest

from deltastore.store import DeltaStore, InvalidName, check_name


@pytest.mark.parametrize("name", ["bot", "support-bot", "v1.2", "A_b-3"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".x", "-x", "a..b", "x" * 65, "a b", "é", "x.delta.safetensors"]
)
def test_invalid_names(name):
    with pytest.raises(InvalidName):
        check_name(name)


def test_commit_is_atomic_and_exclusive(tmp_path, variant_files):
    store = DeltaStore(tmp_path / "s")
    up = store.new_upload()
    up.write_bytes(variant_files["v0"].read_bytes())
    assert store.names() == []  # an upload in progress is not a variant
    store.commit("a", up, replace=False)
    assert store.names() == ["a"] and not up.exists()
    info = store.info("a")
    assert info.size == variant_files["v0"].stat().st_size and len(info.sha256) == 64
    up2 = store.new_upload()
    up2.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        store.commit("a", up2, replace=False)
    assert store.info("a").sha256 == info.sha256
    store.delete("a")
    assert store.names() == []
    with pytest.raises(KeyError):
        store.info("a")
