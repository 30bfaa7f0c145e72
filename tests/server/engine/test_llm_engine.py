"""Engine v2's worker (server/engine/llm_engine.py): mixed-variant steps driven on its
worker thread, checked against every fine-tune materialized and run by plain
transformers; failures and cancellations that concern one request alone."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from deltastore.sources import open_model
from deltastore.store import DeltaStore
from server.engine.core import Engine
from server.engine.job import INTERNAL, Job, SamplingParams
from server.engine.kernels import KernelUnavailable, load_kernels
from server.engine.llm_engine import LLMEngine, QueueFull
from server.metrics import Metrics
from tests.server.conftest import MAX_TOKENS, PROMPTS, make_settings, reference_text

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
WAIT_S = 120


# --------------------------------------------------------------------------- fixtures


@dataclass
class Server:
    scheduler: LLMEngine
    engine: Engine
    metrics: Metrics


@contextmanager
def serving(tiny_dirs, files: dict[str, Path], tmp_path: Path, **kw: Any) -> Iterator[Server]:
    """An engine v2 scheduler over a store of `files`, not started yet (`run` starts
    it, so that what was submitted before is admitted in a known order)."""
    store = tmp_path / "store"
    store.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, store / f"{name}.delta.safetensors")
    settings = make_settings(tiny_dirs["base"], store, **kw)
    engine = Engine(open_model(tiny_dirs["base"]), DeltaStore(store), settings)
    metrics = Metrics()
    scheduler = LLMEngine(engine, settings, metrics)
    try:
        yield Server(scheduler, engine, metrics)
    finally:
        scheduler.stop()


def run(srv: Server, requests: list[Request]) -> None:
    """Submit `requests` in order, start the worker thread, wait for every one to end."""
    for r in requests:
        srv.scheduler.submit(r.job)
    srv.scheduler.start()
    wait_all(requests)


@dataclass
class Request:
    """A job and what it emitted; `ended` is set by its "done" or "error" event."""

    variant: str | None
    prompt: str
    job: Job = field(init=False)
    events: list[tuple[str, Any]] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def outcome(self) -> str:
        return self.events[-1][0]


def request(
    engine: Engine,
    variant: str | None,
    prompt: str,
    params: SamplingParams = GREEDY,
    on_event: Callable[[Request, str], None] | None = None,
) -> Request:
    r = Request(variant, prompt)

    def emit(kind: str, payload: Any) -> None:  # called on the worker thread
        r.events.append((kind, payload))
        if on_event is not None:
            on_event(r, kind)
        if kind in ("done", "error"):
            r.ended.set()

    r.job = Job(variant, engine.tokenizer(prompt)["input_ids"], params, emit)
    return r


def wait_all(requests: list[Request]) -> None:
    deadline = time.monotonic() + WAIT_S
    for r in requests:
        left = max(deadline - time.monotonic(), 0.0)
        assert r.ended.wait(left), f"{r.variant} {r.prompt!r} did not finish in {WAIT_S} s"
    for r in requests:
        ends = [k for k, _ in r.events if k in ("done", "error")]
        assert len(ends) == 1, f"{r.variant} {r.prompt!r} ended {ends}"


def assert_matches_reference(r: Request, refs: dict[str | None, dict[str, str]]) -> None:
    assert r.outcome == "done", f"{r.variant} {r.prompt!r}: {r.events[-1]}"
    assert r.job.finish_reason in ("stop", "length")
    want = refs[r.variant][r.prompt]
    assert r.job.text == want, f"{r.variant} {r.prompt!r}: {r.job.text!r} != {want!r}"
    streamed = "".join(p for k, p in r.events if k == "text")
    assert streamed == r.job.text  # the stream adds up to the final text


def assert_base_restored(engine: Engine, base_dir: Path) -> None:
    engine.activate(None)
    src = open_model(base_dir)
    for n, p in engine.params.items():
        assert torch.equal(p.detach(), src.get(n)), f"{n} is not the base's after the run"


def kernel_available() -> bool:
    try:
        load_kernels()
        return True
    except KernelUnavailable:
        return False


# --------------------------------------------------------------------------- mixed steps


def assert_only_merged_layout_held(engine) -> None:
    """Finished requests release their layouts; only a variant still merged holds its
    own (the other rows subtract it every step)."""
    held = {e.name for e in engine.layouts.list() if e.in_use}
    assert held <= {engine.active} - {None}, f"held {held}, merged {engine.active}"


@pytest.mark.parametrize("delta_kernel", ["native", "torch"])
@pytest.mark.parametrize("merge_policy", ["never", "always", "auto"])
def test_mixed_steps_match_every_finetune(
    tiny_dirs, nine_variants, tmp_path, merge_policy, delta_kernel
):
    if delta_kernel == "native" and not kernel_available():
        pytest.skip("C kernel unavailable")
    files, refs = nine_variants
    models: list[str | None] = [None, *files]
    with serving(
        tiny_dirs,
        files,
        tmp_path,
        max_batch_size=64,  # every request admitted at once
        max_step_tokens=16,  # prompts prefill in chunks, beside the decode rows
        queue_limit=len(models) * len(PROMPTS),
        merge_policy=merge_policy,
        delta_kernel=delta_kernel,
    ) as srv:
        assert srv.scheduler.kv.n_slots == 64
        for name in files:  # laid out ahead, so that every request is admitted at once
            srv.engine.layout(name)
        # prompt-major: the first prompt of every model prefills first, so the decode
        # rows of a step belong to many variants at once
        reqs = [request(srv.engine, m, p) for p in PROMPTS for m in models]
        run(srv, reqs)
    for r in reqs:
        assert_matches_reference(r, refs)

    reg = srv.metrics.registry
    steps = reg.get_sample_value("deltaserve_step_variants_count")
    at_most_8 = reg.get_sample_value("deltaserve_step_variants_bucket", {"le": "8.0"})
    assert steps and steps - at_most_8 > 0, "no step mixed more than 8 variants"
    merged = reg.get_sample_value("deltaserve_steps_total", {"mode": "merged"}) or 0.0
    unmerged = reg.get_sample_value("deltaserve_steps_total", {"mode": "unmerged"}) or 0.0
    assert merged + unmerged == steps
    if merge_policy == "always":
        assert merged > 0
    if merge_policy == "never":
        assert merged == 0
    assert srv.scheduler.kv.free == srv.scheduler.kv.n_slots
    assert_only_merged_layout_held(srv.engine)
    assert_base_restored(srv.engine, tiny_dirs["base"])


def test_a_request_failing_admission_leaves_its_neighbours_alone(
    tiny_dirs, nine_variants, tmp_path
):
    files, refs = nine_variants
    with serving(tiny_dirs, files, tmp_path, max_batch_size=8, max_step_tokens=16) as srv:
        bad_params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=2**70)
        bad = request(srv.engine, "v2", PROMPTS[0], bad_params)  # seed overflows the sampler
        pairs = [("v0", PROMPTS[0]), ("v1", PROMPTS[1]), (None, PROMPTS[2])]
        pairs += [("v2", PROMPTS[3]), ("v5", PROMPTS[4])]
        good = [request(srv.engine, v, p) for v, p in pairs]
        run(srv, [*good[:2], bad, *good[2:]])
    assert bad.outcome == "error" and bad.events[-1][1] == INTERNAL  # no exception text
    assert not any(k == "done" for k, _ in bad.events)
    for r in good:
        assert_matches_reference(r, refs)
    assert srv.scheduler.kv.free == srv.scheduler.kv.n_slots
    assert_only_merged_layout_held(srv.engine)  # bad's layout released


def test_a_cancelled_request_stops_and_frees_its_slot(tiny_dirs, nine_variants, tmp_path):
    files, refs = nine_variants
    with serving(tiny_dirs, files, tmp_path, max_batch_size=4, max_new_tokens=64) as srv:
        long = SamplingParams(max_tokens=64, temperature=0.0)

        def cancel_on_first_text(r: Request, kind: str) -> None:
            if kind == "text":
                r.job.cancelled.set()

        victim = request(srv.engine, "v0", "a", long, on_event=cancel_on_first_text)
        neighbour = request(srv.engine, "v1", PROMPTS[0])
        early = request(srv.engine, "v3", PROMPTS[1])
        early.job.cancelled.set()  # cancelled while still queued
        run(srv, [victim, neighbour, early])
        assert srv.scheduler.in_flight("v0") == 0
        assert srv.scheduler.kv.free == srv.scheduler.kv.n_slots
    for r in (victim, early):
        assert r.outcome == "done" and r.job.finish_reason == "cancelled"
    assert 0 < victim.job.completion_tokens < long.max_tokens
    assert early.job.completion_tokens == 0
    assert_matches_reference(neighbour, refs)
    assert_only_merged_layout_held(srv.engine)


def test_a_merged_variant_whose_layout_was_evicted_does_not_fail_the_step(
    tiny_dirs, variant_files, references, tmp_path
):
    """Room in the mixed tier for one layout. v0's one-token request runs merged
    (policy always) and ends, so v0's layout is no longer in use; v1's request is
    admitted and its layout evicts v0's. The long base prompt takes the whole next
    step (v1's prompt gets no chunk), so the step has base rows only and v0 stays
    merged: its rows need -delta(v0), whose layout must come back into a tier full
    of v1's, in use."""
    files = {v: variant_files[v] for v in ("v0", "v1")}
    with serving(tiny_dirs, files, tmp_path / "sizes") as srv:
        sizes = [srv.engine.layout(v).nbytes for v in files]
    one = max(sizes)
    assert one < 2 * min(sizes), "precondition: the tier must hold one layout, not two"
    long_prompt = " ".join(PROMPTS) * 3  # several steps of prefill at 16 tokens a step
    with serving(
        tiny_dirs,
        files,
        tmp_path,
        max_batch_size=8,
        max_step_tokens=16,
        mixed_cache_bytes=one,
        merge_policy="always",
    ) as srv:
        short = request(srv.engine, "v0", PROMPTS[2], SamplingParams(max_tokens=1, temperature=0))
        long_base = request(srv.engine, None, long_prompt)
        v1 = request(srv.engine, "v1", PROMPTS[4])
        run(srv, [short, long_base, v1])
    assert short.outcome == "done"
    for r in (long_base, v1):
        assert r.outcome == "done", (
            f"{r.variant!r} ended {r.events[-1]}: a step with only base rows kept v0 merged "
            "after its layout was evicted; rebuilding it for the -delta(v0) term raised "
            "CacheFull and failed every running request"
        )
    assert_matches_reference(v1, references)
    assert long_base.job.text == reference_text(tiny_dirs["base"], long_prompt)


def test_a_cold_variant_loads_beside_running_requests_without_stalling_them(
    tiny_dirs, nine_variants, tmp_path
):
    """v1 is not laid out and its load takes 3 s (injected on the loader thread): the
    request on v0 that runs meanwhile keeps getting a token every step; v1's request
    starts once its layout is ready, and both are exact."""
    files, refs = nine_variants
    files = {v: files[v] for v in ("v0", "v1")}
    with serving(tiny_dirs, files, tmp_path, max_batch_size=4, max_new_tokens=64) as srv:
        srv.engine.layout("v0")
        real = srv.engine.load_plain
        loading = threading.Event()

        def slow_load(name: str) -> tuple[Any, ...]:
            loading.set()
            time.sleep(3.0)
            return real(name)

        srv.engine.load_plain = slow_load  # type: ignore[method-assign]
        srv.scheduler.loader._load = slow_load
        stamps: list[float] = []
        long = request(
            srv.engine,
            "v0",
            PROMPTS[0],
            SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
            on_event=lambda r, kind: stamps.append(time.perf_counter()) if kind == "text" else None,
        )
        cold = request(srv.engine, "v1", PROMPTS[1])
        srv.scheduler.submit(long.job)
        srv.scheduler.start()
        while len(stamps) < 3:
            time.sleep(0.01)
        srv.scheduler.submit(cold.job)
        wait_all([long, cold])
        assert loading.is_set()
        during = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(during) < 1.0, f"a {max(during):.2f} s gap between tokens of a running request"
        reg = srv.metrics.registry
        assert (
            reg.get_sample_value(
                "deltaserve_layout_loads_total", {"where": "loader", "outcome": "ok"}
            )
            == 1
        )
        assert reg.get_sample_value("deltaserve_layout_wait_seconds_count") == 1
        assert reg.get_sample_value("deltaserve_layout_wait_seconds_sum") >= 2.5
    assert long.outcome == "done" and long.job.completion_tokens == 48
    assert_matches_reference(cold, refs)


# --------------------------------------------------------------------------- the queue


def test_admission_is_fifo_across_variants_so_none_starves(tiny_dirs, nine_variants, tmp_path):
    """Two KV slots; a hot variant's requests arrive before and after one request of a
    cold variant: the cold one is admitted in its turn, so it ends before the hot
    requests that arrived after it (no variant holds the model while others wait)."""
    files, _ = nine_variants
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    order: list[Request] = []
    with serving(tiny_dirs, files, tmp_path, max_batch_size=2, queue_limit=16) as srv:
        for name in ("v0", "v1"):  # laid out ahead: admission order is the queue's alone
            srv.engine.layout(name)

        def ended(r: Request, kind: str) -> None:
            if kind in ("done", "error"):
                order.append(r)

        hot = [request(srv.engine, "v0", PROMPTS[i % 5], short, ended) for i in range(10)]
        cold = request(srv.engine, "v1", PROMPTS[0], short, ended)
        run(srv, [*hot[:5], cold, *hot[5:]])
    assert all(r.outcome == "done" for r in order) and len(order) == 11
    assert order.index(cold) < max(order.index(r) for r in hot[5:])
    assert order.index(cold) < len(order) - 2, "the cold request waited for the hot queue"


def test_the_queue_limit_refuses_the_next_request(tiny_dirs, nine_variants, tmp_path):
    files, _ = nine_variants
    with serving(tiny_dirs, files, tmp_path, queue_limit=3) as srv:  # not started: all queue
        for _ in range(3):
            srv.scheduler.submit(request(srv.engine, "v0", PROMPTS[0]).job)
        with pytest.raises(QueueFull, match="3 requests queued"):
            srv.scheduler.submit(request(srv.engine, "v0", PROMPTS[0]).job)


def test_admin_actions_run_on_the_worker_and_return_their_errors(
    tiny_dirs, nine_variants, tmp_path
):
    files, _ = nine_variants
    with serving(tiny_dirs, files, tmp_path) as srv:
        srv.scheduler.start()
        name = srv.scheduler.control(lambda e: threading.current_thread().name).result(30)
        assert name == "deltaserve-worker"
        with pytest.raises(ZeroDivisionError):
            srv.scheduler.control(lambda e: 1 / 0).result(30)
