"""Scale-out on Ray Serve, on a local Ray instance (2 replicas of the tiny model):
multiplexed routing keeps each variant on the replica that holds it, outputs equal
the single-process server's, and a killed replica is replaced with the store intact."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from server.ray_serve import LOADS_HEADER, MULTIPLEX_HEADER, REPLICA_HEADER, build_app  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.server.conftest import MAX_TOKENS, PROMPTS, make_settings  # noqa: E402


@pytest.fixture(scope="module")
def ray_serve_url(tiny_dirs, variant_files, tmp_path_factory):
    store = tmp_path_factory.mktemp("ray-store")
    for name, path in variant_files.items():
        shutil.copy(path, store / f"{name}.delta.safetensors")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = make_settings(tiny_dirs["base"], store)
        serve.run(
            build_app(settings, replicas=2, max_variants=2), name="deltaserve", route_prefix="/"
        )
        yield f"http://127.0.0.1:{port}", store
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(url, model, prompt, headers=None):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers or {}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers[REPLICA_HEADER], int(r.headers[LOADS_HEADER])


def _loads(url) -> dict[str, int]:
    """Loads per replica, read from responses (each reports its replica's count)."""
    out: dict[str, int] = {}
    for _ in range(12):
        _, replica, n = _complete(url, "base", PROMPTS[4])
        out[replica] = n
    return out


def test_multiplexed_routing_outputs_and_replica_replacement(ray_serve_url, references):
    url, store = ray_serve_url
    # warm-up: each variant loaded once; Ray's router learns from the replicas'
    # periodic reports which replica holds what (routing is best effort until then)
    for v in ("v0", "v1", "v2", "v3"):
        text, _, _ = _complete(url, v, PROMPTS[0])
        assert text == references[v][PROMPTS[0]], v
        time.sleep(2)
    loads_before = _loads(url)
    # the OpenAI model field routes: each variant stays on one replica, nothing reloads
    seen: dict[str, set[str]] = {}
    for _ in range(3):
        for v in ("v0", "v1", "v2", "v3"):
            for p in PROMPTS[:2]:
                text, replica, _ = _complete(url, v, p)
                assert text == references[v][p], (v, p)  # equal to the single-process server
                seen.setdefault(v, set()).add(replica)
    assert all(len(r) == 1 for r in seen.values()), seen
    assert _loads(url) == loads_before  # no variant loaded again
    assert sum(loads_before.values()) <= 5, loads_before  # ~once per variant, not per request
    # the header alone routes too (the model field names the same variant)
    text, _, _ = _complete(url, "v0", PROMPTS[2], headers={MULTIPLEX_HEADER: "v0"})
    assert text == references["v0"][PROMPTS[2]]
    assert httpx.get(f"{url}/v1/models", timeout=60).json()["data"][1]["parent"]

    # kill one replica: Serve replaces it, the store is intact, outputs unchanged
    victim = next(iter(seen["v0"]))
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Replica" in a["name"]]
    killed = False
    for a in actors:
        handle = ray.get_actor(a["name"], namespace=a["namespace"])
        if (
            str(ray.get(handle.__ray_call__.remote(lambda self: __import__("os").getpid())))
            == victim
        ):
            ray.kill(handle, no_restart=False)
            killed = True
    assert killed, "no replica actor found to kill"
    deadline = time.time() + 120
    replicas_after: set[str] = set()
    while time.time() < deadline:
        try:
            text, replica, _ = _complete(url, "v0", PROMPTS[0])
            assert text == references["v0"][PROMPTS[0]]
            replicas_after.add(replica)
            if victim not in replicas_after and len(replicas_after) >= 1:
                break
        except (AssertionError, httpx.HTTPError):
            pass
        time.sleep(1)
    assert replicas_after and victim not in replicas_after
    assert sorted(p.name for p in store.iterdir()) == [f"v{i}.delta.safetensors" for i in range(5)]


def test_streaming_is_refused_clearly(ray_serve_url):
    url, _ = ray_serve_url
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "v0", "prompt": "a", "stream": True}, timeout=60
    )
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
