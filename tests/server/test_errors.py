"""OpenAI's error shapes (server/errors.py): vLLM's context-length words, where in
the body invalid JSON breaks, and `param` naming the field a message is about."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator

import pytest
from fastapi.exceptions import RequestValidationError

from server.errors import json_position, validation_body
from tests.server.conftest import LiveServer, make_settings

CONTEXT = re.compile(
    r"This model's maximum context length is 256 tokens\. However, your request has "
    r"(\d+) input tokens\. Please reduce the length of the input messages\."
)
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny_dirs, variant_files, tmp_path_factory) -> Iterator[LiveServer]:
    """One server (error shapes do not depend on the engine); its context is the tiny
    model's 256 positions."""
    store = tmp_path_factory.mktemp("errors-store")
    shutil.copy(variant_files["v0"], store / "v0.delta.safetensors")
    srv = LiveServer(make_settings(tiny_dirs["base"], store, max_prompt_tokens=240))
    srv.wait_ready()
    yield srv
    srv.stop()


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    return err


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "v0",\n  "prompt": }',
        '{"model": "v0", "prompt": "a"',
        '\n\n   {"model": "v0" "prompt": "a"}',
        "not json at all",
    ],
)
def test_invalid_json_says_line_and_column(server, raw):
    r = server.client.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    err = _error(r, 400)
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(raw)
    assert err["message"] == f"invalid JSON at line {e.value.lineno} column {e.value.colno}: " + (
        e.value.msg
    )
    assert err["code"] == "invalid_json" and err["param"] is None


def test_json_position_counts_as_json_does():
    doc = 'ab\ncd\n\nxyz"'
    for pos in range(len(doc)):
        e = json.JSONDecodeError("x", doc, pos)
        assert json_position(doc, pos) == (e.lineno, e.colno)
        assert json_position(doc.encode(), pos) == (e.lineno, e.colno)


def test_a_prompt_beyond_the_context_is_vllms_400(server):
    # by tokens: 300 byte tokens > 256 positions
    err = _error(
        server.client.post("/v1/completions", json={"model": "v0", "prompt": "x" * 300}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert int(CONTEXT.fullmatch(err["message"]).group(1)) == 300
    # chat: the messages are what to shorten
    body = {"model": "v0", "messages": [{"role": "user", "content": "y" * 280}]}
    err = _error(server.client.post(CHAT, json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert int(CONTEXT.fullmatch(err["message"]).group(1)) > 280
    # beyond --max-prompt-tokens (240) but within the context: the server's limit, said so
    err = _error(
        server.client.post("/v1/completions", json={"model": "v0", "prompt": "x" * 245}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert err["message"].startswith("This server's maximum prompt length is 240 tokens. ")
    assert "your request has 245 input tokens" in err["message"]
    # so long it is refused before tokenizing (more characters than 240 tokens hold)
    err = _error(
        server.client.post("/v1/completions", json={"model": "v0", "prompt": "word " * 5000}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "25000 characters" in err["message"]


def test_a_completion_beyond_the_context_names_max_tokens(server):
    body = {"model": "v0", "prompt": "x" * 220, "max_tokens": 60}
    err = _error(server.client.post("/v1/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert err["message"] == (
        "'max_tokens' or 'max_completion_tokens' is too large: 60. This model's maximum "
        "context length is 256 tokens and your request has 220 input tokens (60 > 256 - 220)."
    )
    chat = {"model": "v0", "messages": [{"role": "user", "content": "hi"}]}
    err = _error(server.client.post(CHAT, json={**chat, "max_completion_tokens": 10_000}), 400)
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens" in err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "v0", "prompt": "x", "temperature": 9}, "temperature"),
        ("/v1/completions", {"model": "v0"}, "prompt"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, "model"),
        ("/v1/completions", {"model": "v0", "prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
        (
            "/v1/completions",
            {"model": "v0", "prompt": "x", "stop_token_ids": [10**6]},
            "stop_token_ids",
        ),
        ("/v1/completions", {"model": "v0", "prompt": [5, -1]}, "prompt"),
        ("/v1/completions", {"model": "v0", "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
        (
            "/v1/completions",
            {"model": "v0", "prompt": "x", "max_tokens": 2, "min_tokens": 3},
            "min_tokens",
        ),
        ("/v1/completions", {"model": "v0", "prompt": []}, "prompt"),
        (CHAT, {"model": "v0", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            CHAT,
            {"model": "v0", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (CHAT, {"model": "v0+nope", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_param_names_the_field_the_message_is_about(server, path, body, param):
    err = _error(
        server.client.post(path, json=body), 404 if param == "model" and "model" in body else 400
    )
    assert err["param"] == param
    named = param.split(".")[-1] in err["message"] or str(body.get(param)) in err["message"]
    assert named, err["message"]  # the field, or its value


def test_validation_body_shapes_every_error():
    e = RequestValidationError(
        [
            {"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": {}},
            {"type": "x", "loc": ("body", "n"), "msg": "too big", "input": 1},
        ]
    )
    err = validation_body(e)["error"]
    assert err["message"] == "model: Field required; n: too big" and err["param"] == "model"
    whole = RequestValidationError([{"type": "dict_type", "loc": ("body",), "msg": "not a dict"}])
    assert validation_body(whole)["error"]["param"] is None
