"""Prometheus metrics, one registry per app. Labels are bounded: endpoint, status,
swap mode and cache tier; variant names never become labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SWAP = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _CacheCollector(Collector):
    def __init__(self, engine: Callable[[], Any]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        engine = self._engine()
        if engine is None:
            return
        tiers = engine.tiers
        for name, attr, doc in (
            ("hits", "hits", "lookups that found the variant in the tier"),
            ("misses", "misses", "lookups that did not"),
            ("evictions", "evictions", "variants evicted to make room"),
        ):
            fam = CounterMetricFamily(f"deltaserve_cache_{name}", doc, labels=["tier"])
            for t in tiers:
                fam.add_metric([t.tier], getattr(t, attr))
            yield fam
        used = GaugeMetricFamily("deltaserve_cache_bytes", "bytes held per tier", labels=["tier"])
        budget = GaugeMetricFamily(
            "deltaserve_cache_budget_bytes", "byte budget per tier", labels=["tier"]
        )
        for t in tiers:
            used.add_metric([t.tier], t.used)
            budget.add_metric([t.tier], t.budget)
        yield used
        yield budget
        yield GaugeMetricFamily(
            "deltaserve_materialized_variants",
            "variants materialized on the device",
            value=len(engine.materialized.list()),
        )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "deltaserve_requests", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.queue_seconds = Histogram(
            "deltaserve_queue_seconds", "time queued before a batch", buckets=_LATENCY, registry=r
        )
        self.ttft_seconds = Histogram(
            "deltaserve_time_to_first_token_seconds",
            "arrival to first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "deltaserve_request_seconds", "arrival to last token", buckets=_LATENCY, registry=r
        )
        self.generated_tokens = Counter(
            "deltaserve_generated_tokens", "completion tokens generated", registry=r
        )
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "prompt tokens read", registry=r)
        self.swap_seconds = Histogram(
            "deltaserve_swap_seconds",
            "time to put a variant in place, by mode",
            ["mode"],
            buckets=_SWAP,
            registry=r,
        )
        self.batch_size = Histogram(
            "deltaserve_batch_size",
            "requests per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_length = Gauge("deltaserve_queue_length", "requests queued", registry=r)
        # engine v2
        self.step_seconds = Histogram(
            "deltaserve_step_seconds", "forward time of one step", buckets=_LATENCY, registry=r
        )
        self.step_rows = Histogram(
            "deltaserve_step_rows",
            "tokens per step (decode rows plus prefill chunk tokens)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.step_variants = Histogram(
            "deltaserve_step_variants",
            "distinct variants per step (the base not counted)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.steps = Counter(
            "deltaserve_steps",
            "steps by weight mode (a variant merged or not)",
            ["mode"],
            registry=r,
        )
        self.kv_slots_used = Gauge("deltaserve_kv_slots_used", "KV cache slots in use", registry=r)
        self.layout_loads = Counter(
            "deltaserve_layout_loads",
            "variants loaded and laid out, by where (the loader thread or the step loop) "
            "and outcome",
            ["where", "outcome"],
            registry=r,
        )
        self.layout_hits = Counter(
            "deltaserve_layout_hits",
            "requests admitted with their variant already laid out",
            registry=r,
        )
        self.layout_wait_seconds = Histogram(
            "deltaserve_layout_wait_seconds",
            "time a request waited for its variant to be laid out",
            buckets=_LATENCY,
            registry=r,
        )

    def watch_engine(self, engine: Callable[[], Any]) -> None:
        self.registry.register(_CacheCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
