"""Schemathesis against a live server (tiny model, engine v2, three variants) on
127.0.0.1: every operation of its /openapi.json, with positive and negative data,
once without credentials and once with the admin token.

Checks, for every response: no 5xx (schemathesis's `not_a_server_error`), and every
4xx/5xx body in OpenAI's error shape {"error": {"message", "type", "code", ...}}.
A 200 event stream (stream=true) must end in [DONE] with no error event in it.
Failures are collected over the whole run (no shrinking), one per distinct cause
(the exception the server logged, else the body's shape), each with its smallest
reproduction, and reported together at the end.

Bounded: a fixed number of examples per operation and mode, derandomized (the same
requests on every run); the server's max_new_tokens is 8 and schema-local hooks
clamp max_tokens to it and bound prompts, messages and stops. The hooks also steer
requests to names that exist (models, variants); DELETE only ever names the
sacrificial variant (or generated names), so the others stay available to the
operations after it. Uploads (whose body the schema does not declare) get raw
bytes from a hook. (Schemathesis's coverage phase is not run: it has no public API
outside its pytest plugin and CLI.)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup

from server.schemas import ChatCompletionRequest, CompletionRequest
from tests.server.conftest import TOKEN, LiveServer, make_settings

MAX_EXAMPLES = 80  # per operation, per generation mode, per credential set
REQUEST_TIMEOUT_S = 10.0  # a request that hangs longer is a failure
DEADLINE = timedelta(seconds=20)  # hypothesis's per-example deadline (a safety net)
MAX_NEW_TOKENS = 8  # the server's limit, and what the hooks clamp max_tokens to
MAX_CHARS = 48  # prompt / message content / stop strings, after the hooks
MAX_ITEMS = 3  # prompt lists, message lists, stop lists, after the hooks
KEPT = ("v0", "v1")  # variants generated requests may use but never delete
SACRIFICE = "v2"  # the one variant DELETE may name
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# Seeded, and reproductions unsanitized (it would print "max_tokens": "[Filtered]").
SCHEMATHESIS_CONFIG = schemathesis.Config.from_dict(
    {"seed": 0, "output": {"sanitization": {"enabled": False}}}
)
KNOWN_FIELDS = {*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields}


# --------------------------------------------------------------------------- checks


# vLLM's adapter routes answer in vLLM's own error shape: the status as `code`
VLLM_SHAPED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def openai_error_shape(ctx: Any, response: Any, case: Any) -> None:
    """A 4xx/5xx body is {"error": {"message": str, "type": str, "code": str | None}}
    (on vLLM's adapter routes, vLLM's: `code` is the status)."""
    if response.status_code < 400:
        return
    shown = response.content[:300].decode("utf-8", "replace")
    try:
        payload = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {shown!r}") from None
    err = payload.get("error") if isinstance(payload, dict) else None
    assert isinstance(err, dict), f"{response.status_code} body has no 'error' object: {shown}"
    assert isinstance(err.get("message"), str), f"'error.message' is not a string: {shown}"
    assert isinstance(err.get("type"), str), f"'error.type' is not a string: {shown}"
    assert "code" in err, f"'error' has no 'code': {shown}"
    vllm = case.path in VLLM_SHAPED and err["code"] == response.status_code
    assert vllm or err["code"] is None or isinstance(err["code"], str), f"'error.code': {shown}"


def no_error_in_stream(ctx: Any, response: Any, case: Any) -> None:
    """A 200 event stream (stream=true) is JSON events ending in [DONE], none of
    them an error: a server error after the headers went out is still one."""
    kinds = [v for k, vs in response.headers.items() if k.lower() == "content-type" for v in vs]
    if response.status_code != 200 or not any("text/event-stream" in v for v in kinds):
        return
    text = response.content.decode("utf-8", "replace")
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    if not getattr(response, "stream_cut_short", False):  # read to its end
        assert events and events[-1] == "[DONE]", f"stream does not end in [DONE]: {text[-300:]!r}"
    for event in events[:-1]:
        try:
            payload = json.loads(event)
        except ValueError:
            raise AssertionError(f"stream event is not JSON: {event[:300]!r}") from None
        assert not (isinstance(payload, dict) and "error" in payload), (
            f"error event in a 200 stream: {event[:300]}"
        )


CHECKS = [not_a_server_error, openai_error_shape, no_error_in_stream]


# --------------------------------------------------------------------------- hooks


def _text(value: Any) -> Any:
    return value[:MAX_CHARS] if isinstance(value, str) else value


def _tokens(value: Any) -> Any:
    """A token count above MAX_NEW_TOKENS becomes MAX_NEW_TOKENS (of the same type:
    JSON Schema integers may be drawn as integral floats)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and value > MAX_NEW_TOKENS:
        return type(value)(MAX_NEW_TOKENS)
    return value


def bound_body(body: Any) -> Any:
    """Short prompts and stops, few messages, at most MAX_NEW_TOKENS."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    prompt = out.get("prompt")
    if isinstance(prompt, str):
        out["prompt"] = _text(prompt)
    elif isinstance(prompt, list):
        out["prompt"] = [_text(p) for p in prompt[:MAX_ITEMS]]
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [
            {**m, "content": _text(m["content"])} if isinstance(m, dict) and "content" in m else m
            for m in messages[:MAX_ITEMS]
        ]
    stop = out.get("stop")
    if isinstance(stop, str):
        out["stop"] = _text(stop)
    elif isinstance(stop, list):
        out["stop"] = [_text(s) for s in stop[:MAX_ITEMS]]
    for key in ("max_tokens", "max_completion_tokens"):
        if key in out:
            out[key] = _tokens(out[key])
    return out


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=8,
    )


def _upload_bodies() -> st.SearchStrategy[bytes | None]:
    """Bodies for POST /admin/deltas (the schema declares none: it streams raw bytes):
    nothing, random bytes, or safetensors-shaped bytes (a length, a JSON header that
    may lie about tensors, a payload)."""
    header = st.dictionaries(
        st.sampled_from(["__metadata__", "model.layers.0.mlp.up_proj.weight", "x"]),
        _json_values(),
        max_size=3,
    )
    shaped = st.builds(
        lambda h, n, payload: (n if n is not None else len(h)).to_bytes(8, "little") + h + payload,
        header.map(lambda d: json.dumps(d).encode()),
        st.none() | st.integers(0, 2**64 - 1),
        st.binary(max_size=64),
    )
    return st.none() | st.binary(max_size=256) | shaped


def install_hooks(schema: Any, base_name: str) -> None:
    """Schema-local hooks (nothing global): bounded bodies, and names that exist."""
    models = [base_name, *KEPT, SACRIFICE]

    @schema.hook("flatmap_body")
    def flatmap_body(context: Any, body: Any) -> Any:
        """Bounded sizes; most of the time a model that exists, and, half the time,
        without the random extra keys (each one is a 400 unsupported_option)."""
        if not isinstance(body, dict):
            return st.just(bound_body(body))

        def pick(model: str | None, strip: bool) -> Any:
            out = dict(body)
            if strip:
                out = {k: v for k, v in out.items() if k in KNOWN_FIELDS}
            if model is not None and isinstance(out.get("model"), str):
                out["model"] = model
            return bound_body(out)

        return st.builds(pick, st.sampled_from([None, *models]), st.booleans())

    @schema.hook("flatmap_path_parameters")
    def flatmap_path_parameters(context: Any, params: Any) -> Any:
        """Variant names that exist; DELETE names only the sacrificial one."""
        if not isinstance(params, dict) or "name" not in params:
            return st.just(params)
        deleting = context.operation is not None and context.operation.method.upper() == "DELETE"
        names = [SACRIFICE] if deleting else [*KEPT, SACRIFICE]
        return st.sampled_from([None, *names]).map(
            lambda n: params if n is None else {**params, "name": n}
        )

    @schema.hook("flatmap_query")
    def flatmap_query(context: Any, query: Any) -> Any:
        """Uploads sometimes name a variant that exists (409, or replace)."""
        if not isinstance(query, dict) or "name" not in query:
            return st.just(query)
        return st.sampled_from([None, KEPT[0]]).map(
            lambda n: query if n is None else {**query, "name": n}
        )

    @schema.hook("flatmap_case")
    def flatmap_case(context: Any, case: Any) -> Any:
        """Uploads carry a body (schema-less: raw bytes)."""
        if case.operation.label != "POST /admin/deltas":
            return st.just(case)

        def attach(data: bytes | None) -> Any:
            if data is None:
                return case
            derived = case.derive(keep_auth=True)
            derived.body = data
            derived.media_type = "application/octet-stream"
            return derived

        return _upload_bodies().map(attach)


# --------------------------------------------------------------------------- the run


class _Errors(logging.Handler):
    """Exceptions the server logs (uvicorn's "Exception in ASGI application", the
    worker's log.exception), to name the cause of a 500."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(record.exc_info[2])
            where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
            self.seen.append(f"{type(exc).__name__}: {str(exc)[:200]}{where}")
        else:
            self.seen.append(record.getMessage()[:200])


@dataclass
class Finding:
    key: tuple[str, ...]
    what: str
    auth: str
    mode: str
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, Any]
    body: Any
    status: int | None
    response: str
    cause: str
    curl: str
    count: int = 1

    @property
    def size(self) -> int:
        return len(repr((self.path, self.query, self.body, self.headers)))

    def render(self) -> str:
        body = "-" if self.body is None else json.dumps(self.body, ensure_ascii=False)[:400]
        lines = [
            f"[{self.what}] {self.method} {self.path}  ({self.auth}, {self.mode}, "
            f"seen {self.count}x)",
            f"  request headers: {self.headers or '-'}",
            f"  query: {self.query or '-'}",
            f"  body: {body}",
            f"  -> {self.status}: {self.response}",
        ]
        if self.cause:
            lines.append(f"  server exception: {self.cause}")
        lines.append(f"  reproduce: {self.curl}")
        return "\n".join(lines)


@dataclass
class Run:
    url: str
    errors: _Errors
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)

    def record(self, finding: Finding) -> None:
        old = self.findings.get(finding.key)
        if old is None:
            self.findings[finding.key] = finding
            return
        finding.count = old.count + 1
        if finding.size < old.size:  # keep the smallest reproduction
            self.findings[finding.key] = finding
        else:
            old.count = finding.count

    def exercise(self, case: Any, auth: str, mode: str) -> None:
        op = case.operation
        self.errors.seen.clear()
        body = None if isinstance(case.body, NotSet) else case.body
        sent_headers = {k: str(v) for k, v in (case.headers or {}).items()}

        def finding(key: tuple[str, ...], what: str, status: int | None, text: str) -> Finding:
            return Finding(
                key=key,
                what=what,
                auth=auth,
                mode=mode,
                method=case.method,
                path=case.formatted_path,
                headers=sent_headers,
                query=dict(case.query or {}),
                body=body,
                status=status,
                response=text,
                cause=" | ".join(dict.fromkeys(self.errors.seen)),
                curl=_curl(case, self.url),
            )

        try:
            response = case.call(base_url=self.url, session=self.session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as e:
            what = f"no response: {type(e).__name__}"
            self.record(finding((op.label, what), what, None, str(e)[:300]))
            return
        status = response.status_code
        self.statuses.setdefault(op.label, Counter())[_outcome(status, response.content)] += 1
        if status >= 500:
            time.sleep(0.05)  # uvicorn logs the exception after the 500 is sent
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            text = response.content[:300].decode("utf-8", "replace")
            cause = " | ".join(dict.fromkeys(self.errors.seen))
            for failure in group.exceptions:
                what = failure.title
                detail = cause or _error_type(response.content)
                key = (op.label, what, str(status), detail)
                self.record(finding(key, what, status, text))


def _outcome(status: int, content: bytes) -> str:
    """A status, with the error code of a JSON error body (the run's summary)."""
    if status < 400:
        return str(status)
    try:
        err = json.loads(content).get("error")
        return f"{status} {err.get('code')}"
    except (ValueError, AttributeError):
        return f"{status} ?"


def _error_type(content: bytes) -> str:
    """What distinguishes one bad body from another: its top-level keys / error type."""
    try:
        payload = json.loads(content)
    except ValueError:
        return "non-JSON body"
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            return f"error keys {sorted(err)} type={err.get('type')!r} code={err.get('code')!r}"
        return f"keys {sorted(payload)}"
    return type(payload).__name__


def _curl(case: Any, url: str) -> str:
    try:
        return str(case.as_curl_command(base_url=url))
    except Exception as e:  # the repro must never hide the finding
        return f"(no curl: {type(e).__name__})"


def _has_inputs(op: Any) -> bool:
    return bool(list(op.iter_parameters())) or bool(op.body)


def _hypothesis_test(run: Run, strategy: Any, auth: str, mode: GenerationMode) -> Any:
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=DEADLINE,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def each(case: Any) -> None:
        run.exercise(case, auth, mode.value)

    return each


def fuzz(run: Run, schema: Any, auth: str, headers: dict[str, str] | None) -> None:
    for result in schema.get_all_operations():
        op = result.ok()
        modes = [GenerationMode.POSITIVE]
        if _has_inputs(op):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            each = _hypothesis_test(
                run, op.as_strategy(generation_mode=mode, headers=headers), auth, mode
            )
            try:
                each()
            except Unsatisfiable:
                continue  # nothing in this operation can be made invalid (string headers/paths)
            except Exception as e:  # generation or hypothesis itself failed
                what = f"test error: {type(e).__name__}"
                run.record(
                    Finding(
                        key=(op.label, what),
                        what=what,
                        auth=auth,
                        mode=mode.value,
                        method=op.method.upper(),
                        path=op.path,
                        headers={},
                        query={},
                        body=None,
                        status=None,
                        response=str(e)[:500],
                        cause="",
                        curl="-",
                    )
                )


@pytest.fixture
def server(tiny_dirs, variant_files, tmp_path) -> Iterator[LiveServer]:
    """Engine v2 on 127.0.0.1; a fresh store of v0..v2 for each credential set."""
    store = tmp_path / "store"
    store.mkdir()
    for name in (*KEPT, SACRIFICE):
        shutil.copy(variant_files[name], store / f"{name}.delta.safetensors")
    roots = tmp_path / "adapters"  # load_lora_adapter's paths are checked, never found
    roots.mkdir()
    settings_ = make_settings(
        tiny_dirs["base"], store, max_new_tokens=MAX_NEW_TOKENS, adapter_roots=[roots]
    )
    assert settings_.host == "127.0.0.1"
    srv = LiveServer(settings_)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.mark.parametrize("auth", ["anonymous", "admin"])
def test_schemathesis(server: LiveServer, auth: str) -> None:
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(
        f"{server.url}/openapi.json", config=SCHEMATHESIS_CONFIG, timeout=10
    )
    install_hooks(schema, server.state.base_name)
    errors = _Errors()
    watched = [logging.getLogger("uvicorn.error"), logging.getLogger("server")]
    for logger in watched:
        logger.addHandler(errors)
    run = Run(url=server.url, errors=errors)
    try:
        fuzz(run, schema, auth, ADMIN if auth == "admin" else None)
    finally:
        for logger in watched:
            logger.removeHandler(errors)
        run.session.close()

    summary = "\n".join(
        f"  {label}: {dict(sorted(c.items()))}" for label, c in sorted(run.statuses.items())
    )
    print(
        f"\n{auth}: {sum(sum(c.values()) for c in run.statuses.values())} requests in "
        f"{time.monotonic() - started:.1f}s; statuses per operation:\n{summary}"
    )
    if run.findings:
        report = "\n\n".join(f.render() for f in run.findings.values())
        pytest.fail(f"{len(run.findings)} distinct failure(s) ({auth}):\n\n{report}", pytrace=False)
    untested = {r.ok().label for r in schema.get_all_operations()} - set(run.statuses)
    assert not untested, f"operations never answered: {sorted(untested)}"
