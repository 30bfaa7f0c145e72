"""Structured output over HTTP (server/structured.py): OpenAI's `response_format` and
vLLM's `guided_json` / `guided_regex` / `guided_choice` on both routes, streamed or
not, beside free requests of other variants; bad input is a 400 naming the field; and,
end to end, the shipped json-extract demo answering JSON under a schema."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MAX_TOKENS, PROMPTS, LiveServer, make_settings

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Oslo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
CHAT = [{"role": "user", "content": "the cat sat"}]


def _post(live, route: str, body: dict) -> dict:
    r = live.client.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_response_format_json_schema_validates_beside_free_requests(live, references):
    """Held requests (chat and completions, several seeds and temperatures, n = 2) sent
    at once with free requests of other variants: every held choice validates, every
    free one matches its fine-tune's reference."""
    held = [
        (
            "/v1/chat/completions",
            {
                "model": f"v{i}",
                "messages": CHAT,
                "response_format": FORMAT,
                "n": 2,
                "max_tokens": 60,
                "temperature": t,
                "seed": i,
            },
        )
        for i, t in [(0, 0.0), (1, 0.8), (2, 1.3)]
    ] + [
        (
            "/v1/completions",
            {
                "model": live.state.base_name,
                "prompt": "on a mat",
                "guided_json": PERSON,
                "max_tokens": 60,
                "temperature": 1.0,
                "seed": 7,
                "n": 2,
            },
        )
    ]
    free = [
        (
            "/v1/completions",
            {"model": f"v{i}", "prompt": PROMPTS[i], "temperature": 0, "max_tokens": MAX_TOKENS},
        )
        for i in (3, 4)
    ]
    with ThreadPoolExecutor(len(held) + len(free)) as pool:
        answers = list(pool.map(lambda rb: _post(live, *rb), held + free))
    for (route, _), answer in zip(held, answers, strict=False):
        for c in answer["choices"]:
            text = c["message"]["content"] if "chat" in route else c["text"]
            assert c["finish_reason"] == "stop", text
            jsonschema.validate(json.loads(text), PERSON)
    for (_, body), answer in zip(free, answers[len(held) :], strict=True):
        assert answer["choices"][0]["text"] == references[body["model"]][body["prompt"]]


def test_json_object_choice_and_regex(live):
    obj = _post(
        live,
        "/v1/chat/completions",
        {
            "model": "v1",
            "messages": CHAT,
            "response_format": {"type": "json_object"},
            "max_tokens": 60,
            "temperature": 0,
        },
    )["choices"][0]
    if obj["finish_reason"] == "stop":  # any object: max_tokens may cut it ("length")
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    else:
        assert obj["finish_reason"] == "length" and obj["message"]["content"].startswith("{")
    choices = ["cat", "dog", "a mat"]
    for seed in range(4):
        got = _post(
            live,
            "/v1/completions",
            {
                "model": "v2",
                "prompt": "the",
                "guided_choice": choices,
                "temperature": 1.0,
                "seed": seed,
                "max_tokens": 10,
            },
        )["choices"][0]
        assert got["text"] in choices and got["finish_reason"] == "stop"
    pattern = r"\d{3}-[a-z]{2,4}"
    got = _post(
        live,
        "/v1/completions",
        {
            "model": "v3",
            "prompt": "ran",
            "guided_regex": pattern,
            "temperature": 1.0,
            "max_tokens": 20,
            "n": 3,
            "seed": 1,
        },
    )
    for c in got["choices"]:
        assert re.fullmatch(pattern, c["text"]) and c["finish_reason"] == "stop", c["text"]
    text = _post(
        live,
        "/v1/chat/completions",
        {
            "model": "v0",
            "messages": CHAT,
            "response_format": {"type": "text"},
            "max_tokens": 4,
        },
    )
    assert text["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_held_stream_adds_up_to_valid_json(live):
    body = {
        "model": "v4",
        "messages": CHAT,
        "response_format": FORMAT,
        "stream": True,
        "max_tokens": 60,
        "temperature": 0.9,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 3,
    }
    events = live.client.post("/v1/chat/completions", json=body).text.split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert events[-2] == "data: [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    lps = [e for c in chunks for e in (c["choices"][0].get("logprobs") or {}).get("content") or []]
    assert lps and all(e["logprob"] <= 0 for e in lps)
    assert all(t["logprob"] >= -9999.0 for e in lps for t in e["top_logprobs"])


def test_the_openai_client_parses_into_a_pydantic_model(live):
    """What an OpenAI user writes: `chat.completions.parse` with a pydantic model (the
    client sends it as a strict json_schema and parses the answer back)."""

    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=120)
        city: Literal["Oslo", "Lima"]

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    for seed in range(3):
        got = client.chat.completions.parse(
            model="v2",
            messages=CHAT,
            response_format=Person,
            max_completion_tokens=60,
            temperature=1.0,
            seed=seed,
        )
        choice = got.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "nope"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ],
)
def test_bad_structured_output_is_a_400_naming_the_field(live, extra, param):
    for route, body in [
        ("/v1/completions", {"model": "v0", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "v0", "messages": CHAT}),
    ]:
        r = live.client.post(route, json={**body, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert param.split(".")[0] in err["message"]


@pytest.mark.e2e
def test_the_json_extract_demo_answers_valid_json_under_a_schema(embedded_base, tmp_path):
    """The product's demo on the real base: json-extract held to a schema, greedy and
    sampled, beside a free request of the base."""
    from deltastore.demo import install_demos
    from deltastore.store import DeltaStore

    store = tmp_path / "store"
    install_demos(embedded_base, DeltaStore(store), progress=False)
    srv = LiveServer(make_settings(embedded_base, store, max_new_tokens=64))
    try:
        srv.wait_ready(timeout=120)
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "city": {"type": "string"},
            },
            "required": ["name", "age", "city"],
            "additionalProperties": False,
        }
        prompt = "Extract name, age and city as JSON: Mateo lives in Buenos Aires. He is 45."
        held = {
            "model": "json-extract",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 48,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": schema, "strict": True},
            },
        }
        free = {"model": srv.state.base_name, "messages": CHAT, "max_tokens": 8}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda b: _post(srv, "/v1/chat/completions", b),
                    [
                        {**held, "temperature": 0},
                        {**held, "temperature": 1.0, "seed": 1},
                        {**held, "temperature": 1.0, "seed": 2},
                        free,
                    ],
                )
            )
        for a in answers[:3]:
            c = a["choices"][0]
            assert c["finish_reason"] == "stop", c
            got = json.loads(c["message"]["content"])
            jsonschema.validate(got, schema)
        greedy = json.loads(answers[0]["choices"][0]["message"]["content"])
        assert greedy == {"name": "Mateo", "age": 45, "city": "Buenos Aires"}
    finally:
        srv.stop()
        shutil.rmtree(store, ignore_errors=True)
