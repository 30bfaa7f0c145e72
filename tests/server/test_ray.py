"""Scale-out on Ray Serve, on a local Ray instance (2 replicas of the tiny model):
multiplexed routing keeps each variant on the replica that holds it, outputs equal
the single-process server's, and a killed replica is replaced with the store intact."""

from __future__ import annotations

import json
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


def _same(ours: dict, theirs: dict) -> bool:
    """Two responses are the same but for what differs per call (their id and time)
    and float rounding: another process batches other rows with a request, so its sums
    run in another order (logprobs agree to 1e-3, far tighter than any real change)."""

    def same(a: object, b: object) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= 1e-3
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    skip = ("id", "created")
    return same(
        {k: v for k, v in ours.items() if k not in skip},
        {k: v for k, v in theirs.items() if k not in skip},
    )


SURFACE = [
    (
        "/v1/completions",
        {
            "model": "v1",
            "prompt": ["the cat", "on a"],
            "max_tokens": 6,
            "temperature": 0.9,
            "seed": 4,
            "n": 2,
            "logprobs": 2,
            "echo": True,
            "top_k": 20,
            "repetition_penalty": 1.2,
            "presence_penalty": 0.2,
        },
    ),
    (
        "/v1/completions",
        {"model": "v2", "prompt": [[5, 6, 7]], "max_tokens": 0, "echo": True, "logprobs": 1},
    ),
    (
        "/v1/chat/completions",
        {
            "model": "v3",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "min_tokens": 2,
            "stop_token_ids": [7],
        },
    ),
    ("/v1/completions", {"model": "base", "prompt": "x" * 250, "max_tokens": 20}),  # a 400
    (
        "/v1/completions",
        {"model": "0.5*v1+v3", "prompt": "the cat", "max_tokens": 6, "temperature": 0},
    ),  # a composition, merged on the replica
    ("/tokenize", {"model": "v0", "prompt": "the cat", "return_token_strs": True}),
    ("/detokenize", {"tokens": [5, 6, 7]}),
]


def test_the_whole_surface_equals_the_single_process_server(ray_serve_url, tiny_dirs):
    """Every option, streamed and not, through the Ray ingress: the same answers as
    one process serving the same store."""
    import openai

    from tests.server.conftest import LiveServer
    from tests.server.routes.test_openai_surface import exercise_openai_client

    url, store = ray_serve_url
    local = LiveServer(make_settings(tiny_dirs["base"], store))
    local.wait_ready()
    try:
        for path, body in SURFACE:
            ours = httpx.post(f"{url}{path}", json=body, timeout=120)
            theirs = local.client.post(path, json=body)
            assert ours.status_code == theirs.status_code, (path, ours.text)
            assert _same(ours.json(), theirs.json()), (path, ours.json(), theirs.json())
            if "model" in body and "tokenize" not in path and ours.status_code == 200:
                streamed = httpx.post(f"{url}{path}", json={**body, "stream": True}, timeout=120)
                local_stream = local.client.post(path, json={**body, "stream": True})
                assert streamed.headers["content-type"].startswith("text/event-stream")
                events = [e for e in streamed.text.split("\n\n") if e.strip()]
                local_events = [e for e in local_stream.text.split("\n\n") if e.strip()]
                assert events[-1] == "data: [DONE]" and len(events) == len(local_events)
                for a, b in zip(events[:-1], local_events[:-1], strict=True):
                    assert _same(json.loads(a[6:]), json.loads(b[6:])), (a, b)
        exercise_openai_client(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        card = client.models.retrieve("v0")
        assert (card.model_extra or {})["delta"]["method"] == "darex-q"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("missing")
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="v0", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
        )
        assert (
            text
            == local.client.post(
                "/v1/completions",
                json={
                    "model": "v0",
                    "prompt": PROMPTS[0],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
            ).json()["choices"][0]["text"]
        )
        # a client that leaves mid-stream: the replica goes on serving
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            timeout=120,
            json={
                "model": "v0",
                "prompt": "a",
                "max_tokens": 60,
                "stream": True,
                "ignore_eos": True,
            },
        ) as r:
            next(r.iter_lines())
        assert (
            _complete(url, "v0", PROMPTS[1])[0]
            == local.client.post(
                "/v1/completions",
                json={
                    "model": "v0",
                    "prompt": PROMPTS[1],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
            ).json()["choices"][0]["text"]
        )
    finally:
        local.stop()
