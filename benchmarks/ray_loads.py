"""Variant loads per 1000 requests on Ray Serve: multiplexed routing vs without.

    python -m benchmarks.ray_loads [--requests 1000] [--variants 6]

Two replicas of the embedded base, each holding at most 2 variants (Ray's
multiplexing LRU), --variants variants (> what one replica holds) under
Zipf(1.0), --requests requests of 1 token from 4 concurrent clients, seed 0. With
multiplexed routing the ingress sets the request's `serve_multiplexed_model_id`;
without, Ray spreads requests over replicas regardless of variant. Loads are
counted by the replicas themselves (reported in a response header).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from benchmarks.serve import synthetic_variant
from deltastore.embedded import ensure_embedded_base
from deltastore.paths import cache_dir
from server.config import Settings
from server.ray_serve import LOADS_HEADER, REPLICA_HEADER, build_app


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(url: str, names: list[str], requests: int) -> dict[str, int]:
    rng = random.Random(0)
    weights = [1.0 / (r + 1) for r in range(len(names))]
    order = [rng.choices(names, weights)[0] for _ in range(requests)]
    loads: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        queue = list(order)

        async def worker() -> None:
            while queue:
                model = queue.pop()
                body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                rep = r.headers[REPLICA_HEADER]
                loads[rep] = max(loads.get(rep, 0), int(r.headers[LOADS_HEADER]))

        await asyncio.gather(*(worker() for _ in range(4)))
    return loads


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--variants", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_loads.json"))
    args = ap.parse_args()
    base_dir = ensure_embedded_base()
    store = cache_dir() / "bench" / f"ray-store-{args.variants}"
    store.mkdir(parents=True, exist_ok=True)
    names = [f"v{i}" for i in range(args.variants)]
    for i, n in enumerate(names):
        if not (store / f"{n}.delta.safetensors").is_file():
            synthetic_variant(base_dir, store / f"{n}.delta.safetensors", seed=i + 1)
    result: dict[str, object] = {
        "requests": args.requests,
        "variants": args.variants,
        "replicas": 2,
        "variants_per_replica": 2,
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for label, by_model in (("multiplexed", True), ("without multiplexing", False)):
            port = _port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = Settings(base=base_dir, store=store, demo=False)
            serve.run(
                build_app(settings, 2, 2, route_by_model=by_model),
                name="deltaserve",
                route_prefix="/",
            )
            t0 = time.time()
            loads = asyncio.run(drive(f"http://127.0.0.1:{port}", names, args.requests))
            total = sum(loads.values())
            result[label] = {
                "loads": total,
                "per_1000": 1000 * total / args.requests,
                "per_replica": loads,
                "seconds": time.time() - t0,
            }
            print(
                f"{label}: {total} loads in {args.requests} requests "
                f"({1000 * total / args.requests:.0f} per 1000), per replica {loads}"
            )
            serve.shutdown()
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
