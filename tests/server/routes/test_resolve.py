"""One lookup per request (server/routes/resolve.py): a model name becomes a Target
with the engine's key, a composition's members, a fingerprint and the versions of the
files it was resolved against; the door refuses a file deleted since."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from deltastore.store import DeltaStore
from server.errors import APIError
from server.metrics import Metrics
from server.routes.resolve import door, resolve
from server.state import AppState
from tests.server.conftest import make_settings


@pytest.fixture
def state(tiny_dirs: dict[str, Path], variant_files: dict[str, Path], tmp_path: Path) -> AppState:
    store = tmp_path / "store"
    store.mkdir()
    for name in ("v0", "v1"):
        shutil.copy(variant_files[name], store / f"{name}.delta.safetensors")
    settings = make_settings(tiny_dirs["base"], store)
    return AppState(settings, DeltaStore(store), Metrics())


def _resolve(state: AppState, name: str) -> Any:
    return asyncio.run(resolve(state, name))


def test_a_variant_resolves_to_its_file_version_and_fingerprint(state):
    assert _resolve(state, state.base_name) is None
    t = _resolve(state, "v0")
    assert (t.key, t.members, t.files) == ("v0", (), ("v0",))
    assert t.versions == (state.store.stamp("v0"),)
    assert t.fingerprint == f"fp_{state.store.info('v0').sha256[:16]}"


def test_a_composition_resolves_to_its_canonical_key_and_members(state):
    a, b = _resolve(state, "v1+0.5*v0"), _resolve(state, "0.5*v0+v1")
    assert a == b and a.key == "0.5*v0+v1" and a.composed
    assert a.members == (("v0", 0.5), ("v1", 1.0)) and a.files == ("v0", "v1")
    assert a.versions == (None, state.store.stamp("v0"), state.store.stamp("v1"))
    assert a.fingerprint not in (None, _resolve(state, "v0").fingerprint)


def test_unknown_names_and_bad_expressions_are_refused(state):
    for name, status in (("nope", 404), ("v0+nope", 404), ("v0+", 400), ("../x", 404)):
        with pytest.raises(APIError) as e:
            _resolve(state, name)
        assert e.value.status == status, name


def test_the_door_refuses_a_file_deleted_since_the_lookup(state):
    target = _resolve(state, "v0+v1")
    state.store.delete("v1")
    with pytest.raises(APIError) as e:
        asyncio.run(door(state, target, "v0+v1", request=None))  # type: ignore[arg-type]
    assert e.value.status == 404 and "v1" in e.value.message
