"""Locust load test for deltaserve (or any OpenAI-compatible server).

    pip install locust
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 8 -r 8 -t 60s

Each simulated user sends completions to a model drawn from what /v1/models lists,
with Zipf popularity (DELTASERVE_ZIPF, default 1.0; 0 = uniform), streaming when
DELTASERVE_STREAM=1 (Locust then times the whole stream), and DELTASERVE_MAX_TOKENS
tokens each (default 32). `deltaserve loadtest` drives the same endpoints with no
extra dependency and also reports time to first token and the server's counters.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, events, task

MODELS: list[str] = []
WEIGHTS: list[float] = []


@events.test_start.add_listener
def _list_models(environment, **_kwargs):  # type: ignore[no-untyped-def]
    import httpx

    data = httpx.get(f"{environment.host}/v1/models", timeout=30).json()["data"]
    MODELS[:] = [m["id"] for m in data]
    s = float(os.environ.get("DELTASERVE_ZIPF", "1.0"))
    WEIGHTS[:] = [1.0 / (rank + 1) ** s for rank in range(len(MODELS))]


class CompletionUser(HttpUser):
    wait_time = between(0, 0.1)

    @task
    def complete(self) -> None:
        model = random.choices(MODELS, WEIGHTS)[0]
        stream = os.environ.get("DELTASERVE_STREAM") == "1"
        body = {
            "model": model,
            "prompt": "Write one sentence about the sea.",
            "max_tokens": int(os.environ.get("DELTASERVE_MAX_TOKENS", "32")),
            "temperature": 0,
            "stream": stream,
        }
        # one request name for all models: per-variant names would be unbounded
        with self.client.post(
            "/v1/completions",
            json=body,
            name="/v1/completions",
            stream=stream,
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif stream:
                for _ in r.iter_lines():
                    pass
