"""Structured output on the HTTP side: what a request asks its output to be, compiled
before the request is queued.

A request names at most one of: OpenAI's `response_format` (`{"type": "json_object"}`:
any JSON object; `{"type": "json_schema", "json_schema": {"name", "schema"}}`: JSON
that validates against the schema; `{"type": "text"}`: no constraint) or vLLM's
`guided_json` (a schema, or its text), `guided_regex` (the whole output matches it) or
`guided_choice` (the output is one of the strings). Its grammar is compiled here (on a
thread of the HTTP side, cached by (kind, spec): server/engine/grammar.py), so a schema
or pattern the grammar library cannot read is a 400 naming the field, and the step loop
never compiles. Every choice of the request (prompts x n) is held to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from server.engine.grammar import Grammar, GrammarKind, Grammars
from server.engine.sequence import end_token_ids
from server.errors import APIError
from server.schemas import SamplingFields
from server.state import AppState

MAX_MESSAGE = 400  # characters of the grammar library's reason shown to the client


@dataclass(frozen=True)
class Spec:
    """What a request asks of its output, and the field that asked."""

    kind: GrammarKind
    text: str  # the canonical spec: a key of the compiled grammars' cache
    param: str


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", "invalid_structured_output", param)


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema (an object, or its JSON text) as canonical JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _bad(param, f"not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise _bad(param, f"a JSON schema is an object, not {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def spec_of(req: SamplingFields) -> Spec | None:
    """The constraint a request asks for (None: none); a 400 when it asks for several
    or for one that cannot be (an empty guided_choice, a json_schema without schema)."""
    fmt = (
        req.response_format if req.response_format and req.response_format.type != "text" else None
    )
    given = [
        name
        for name, value in (
            ("response_format", fmt),
            ("guided_json", req.guided_json),
            ("guided_regex", req.guided_regex),
            ("guided_choice", req.guided_choice),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise APIError(
            400,
            f"give at most one of response_format (json_object, json_schema), guided_json, "
            f"guided_regex, guided_choice; got {', '.join(given)}",
            "invalid_structured_output",
            given[1],
        )
    if fmt is not None and fmt.type == "json_object":
        return Spec(GrammarKind.JSON_OBJECT, "", "response_format")
    if fmt is not None:  # json_schema
        param = "response_format.json_schema.schema"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise _bad(param, 'type "json_schema" needs json_schema.schema, the JSON schema')
        return Spec(GrammarKind.JSON_SCHEMA, _schema_text(fmt.json_schema.schema_, param), param)
    if req.guided_json is not None:
        return Spec(
            GrammarKind.JSON_SCHEMA, _schema_text(req.guided_json, "guided_json"), "guided_json"
        )
    if req.guided_regex is not None:
        return Spec(GrammarKind.REGEX, req.guided_regex, "guided_regex")
    choices = req.guided_choice
    if choices is None:
        return None
    if not choices:
        raise _bad("guided_choice", "an empty list: give the strings the output may be")
    if any(not c for c in choices):
        raise _bad("guided_choice", "an empty string is not a choice")
    return Spec(GrammarKind.CHOICE, json.dumps(choices), "guided_choice")


def grammars(state: AppState, engine: Any) -> Grammars:
    """The server's compiled grammars, built on first use from the HTTP side's tokenizer
    (the same files as the worker's), the model's vocabulary (its logits' width) and the
    tokens that end a choice. Called under the tokenizer lock."""
    if state.grammars is None:
        tok = state.tokenizer
        vocab = int(engine.model.config.vocab_size)
        state.grammars = Grammars(tok, vocab, end_token_ids(engine.model, tok))
    return state.grammars


async def grammar_of(state: AppState, engine: Any, req: SamplingFields) -> Grammar | None:
    """The compiled grammar the request's choices are held to (None: unconstrained);
    a 400 naming the field when it cannot be compiled."""
    spec = spec_of(req)
    if spec is None:
        return None
    try:
        table = await state.tokenize(lambda _: grammars(state, engine))
    except ValueError as e:
        raise APIError(400, str(e), "structured_output_unsupported", spec.param) from None
    try:
        return await run_in_threadpool(table.get, spec.kind, spec.text)
    except ValueError as e:
        reason = str(e).strip()
        if len(reason) > MAX_MESSAGE:
            reason = reason[:MAX_MESSAGE] + " …"
        what = {
            GrammarKind.JSON_SCHEMA: "the JSON schema",
            GrammarKind.REGEX: "the regular expression",
            GrammarKind.CHOICE: "the choices",
            GrammarKind.JSON_OBJECT: "the JSON grammar",
        }[spec.kind]
        raise _bad(spec.param, f"{what} cannot be used: {reason}") from None
