"""Structured output in the engine (server/engine/grammar.py, the mask in sampling.py):
the bitmask allows exactly the tokens the grammar takes; constrained rows sample only
those, beside unconstrained rows that sample what they would alone; choices driven to
the end by random logits always parse and validate; and on the tiny model, constrained
requests in mixed steps beside other variants answer valid JSON while their neighbours
match their references."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch

from deltastore.testing import tiny_tokenizer
from server.engine.grammar import GrammarKind, Grammars, fill_bitmask, mask_words
from server.engine.job import Job, SamplingParams
from server.engine.sampling import (
    LOGPROB_FLOOR,
    ChoiceSampling,
    Row,
    SamplingBatch,
    sample_on_host,
)
from server.engine.sequence import Sequence
from tests.server.conftest import PROMPTS
from tests.server.engine.test_llm_engine import (
    assert_matches_reference,
    request,
    run,
    serving,
)

V = 260  # the tiny model's vocabulary (258 tokenizer tokens, 2 beyond)
EOS = 256
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Oslo", "Lima", "Rio de Janeiro"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def grammars(tok) -> Grammars:
    return Grammars(tok, V, {EOS})


def _allowed(words: np.ndarray) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {int(t) for t in np.flatnonzero(bits)}


def _sequence(tok, params: SamplingParams, prompt=(1, 2, 3)) -> Sequence:
    job = Job(None, list(prompt), params, emit=lambda kind, payload: None)
    return Sequence(job, 0, tok, {EOS})


def test_the_bitmask_allows_exactly_the_tokens_the_grammar_takes(grammars, tok):
    g = grammars.get(GrammarKind.JSON_SCHEMA, json.dumps(PERSON))
    m = g.matcher()
    for piece in ['{"name": "', "ab", '", "age": 4']:
        for t in tok(piece)["input_ids"]:
            m.advance(t)
        (words,) = fill_bitmask([m])
        assert words.shape == (mask_words(V),) and mask_words(V) % 2 == 0
        allowed = _allowed(words)
        taken = {t for t in range(V) if m.state.deep_copy().consume_token(t)}
        assert allowed == taken and allowed, piece
        assert all(t < 258 for t in allowed), "tokens beyond the tokenizer are never allowed"


def test_compiled_grammars_are_cached_by_kind_and_spec_and_bounded(tok):
    table = Grammars(tok, V, {EOS}, capacity=2)
    a = table.get(GrammarKind.REGEX, "a+")
    assert table.get(GrammarKind.REGEX, "a+") is a
    table.get(GrammarKind.REGEX, "b+")
    table.get(GrammarKind.REGEX, "a+")  # touched: b+ is the oldest now
    table.get(GrammarKind.REGEX, "c+")
    assert len(table) == 2
    assert table.get(GrammarKind.REGEX, "a+") is a
    for kind, spec in [
        (GrammarKind.REGEX, "a(b"),
        (GrammarKind.JSON_SCHEMA, '{"type": "frobnicate"}'),
        (GrammarKind.JSON_SCHEMA, '{"$ref": "#/nowhere"}'),
    ]:
        with pytest.raises(ValueError):
            table.get(kind, spec)


def test_constrained_rows_sample_allowed_tokens_beside_rows_that_sample_as_alone(grammars, tok):
    choice = grammars.get(GrammarKind.CHOICE, json.dumps(["yes", "no", "maybe"]))
    free = SamplingParams(8, temperature=0.9, seed=5, top_k=20)
    for seed in range(20):
        logits = torch.randn(4, V, generator=torch.Generator().manual_seed(seed)) * 4
        held = SamplingParams(8, temperature=0.9, seed=seed, logprobs=5)
        matchers = [choice.matcher(), choice.matcher()]
        rows = [
            Row(0, ChoiceSampling.of(held, [1], {EOS}), [], matchers[0]),
            Row(1, ChoiceSampling.of(free, [1], {EOS}), []),
            Row(2, ChoiceSampling.of(held, [1], {EOS}), [], matchers[1]),
            Row(3, ChoiceSampling.of(SamplingParams(8, temperature=0.0), [1], {EOS}), []),
        ]
        out, _ = sample_on_host(SamplingBatch(rows, [], V), logits)
        first = {
            tok("yes")["input_ids"][0],
            tok("no")["input_ids"][0],
            tok("maybe")["input_ids"][0],
        }
        assert out[0][0] in first and out[2][0] in first
        # a constrained row's logprobs are those of its masked logits: only allowed
        # tokens have mass, the others report the floor
        entry = out[0][1]
        assert entry is not None
        masked = torch.full((V,), float("-inf"))
        masked[list(first)] = logits[0, list(first)]
        want = torch.log_softmax(masked, -1)[entry.token].item()
        assert entry.logprob == pytest.approx(want, abs=1e-5)
        assert all(lp == LOGPROB_FLOOR for t, lp in entry.top if t not in first)
        assert sum(t in first for t, _ in entry.top) == len(first)
        # the unconstrained rows: what they sample alone
        for i in (1, 3):
            alone = SamplingBatch([Row(0, rows[i].choice, [])], [], V)
            assert sample_on_host(alone, logits[i : i + 1])[0][0][0] == out[i][0]


def test_a_step_without_constrained_rows_sends_nothing_for_them():
    from server.engine.transfer import Packer

    p = Packer()
    SamplingBatch([Row(0, ChoiceSampling.of(SamplingParams(4), [1], {EOS}), [])], [], V).pack(p)
    assert not {"s.allowed", "s.constrained"} & set(p.send(torch.device("cpu")))


def _drive(tok, grammar, params: SamplingParams, seed: int, rows: int = 3) -> list[Sequence]:
    """`rows` choices held to `grammar` and one free choice, sampled together from random
    logits (with a bias toward the end token) until each ends."""
    seqs = [_sequence(tok, params) for _ in range(rows)]
    seqs.append(_sequence(tok, SamplingParams(16, temperature=1.0, seed=seed)))
    g = torch.Generator().manual_seed(seed)
    while not all(s.done for s in seqs):
        live = [s for s in seqs if not s.done]
        batch = SamplingBatch(
            [Row(i, s.sampling, s.ids, s.grammar) for i, s in enumerate(live)], [], V
        )
        logits = torch.randn(len(live), V, generator=g) * 3
        logits[:, EOS] += 2.0
        out, _ = sample_on_host(batch, logits)
        for s, (token, entry) in zip(live, out, strict=True):
            s.add(token, entry)
    return seqs


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_schema_held_choices_always_parse_and_validate(grammars, tok, temperature):
    person = grammars.get(GrammarKind.JSON_SCHEMA, json.dumps(PERSON))
    anything = grammars.get(GrammarKind.JSON_OBJECT, "")
    for seed in range(4):
        params = SamplingParams(160, temperature=temperature, seed=seed, top_p=0.9)
        held = _drive(tok, person, replace(params, grammar=person), seed)
        for s in held[:-1]:
            assert s.job.finish_reason == "stop", s.job.text
            jsonschema.validate(json.loads(s.job.text), PERSON)
        params = replace(params, max_tokens=60, grammar=anything)
        objects = _drive(tok, anything, params, seed + 100)
        for s in objects[:-1]:
            if s.job.finish_reason == "stop":  # any object is unbounded: "length" may cut it
                assert isinstance(json.loads(s.job.text), dict), s.job.text


def test_regex_and_choice_outputs_match(grammars, tok):
    pattern = r"[A-Z][a-z]{1,5} \d{2}"
    regex = grammars.get(GrammarKind.REGEX, pattern)
    choices = ["red", "green", "blue sky"]
    choice = grammars.get(GrammarKind.CHOICE, json.dumps(choices))
    for seed in range(8):
        params = SamplingParams(40, temperature=1.0, seed=seed)
        for s in _drive(tok, regex, replace(params, grammar=regex), seed)[:-1]:
            assert s.job.finish_reason == "stop" and re.fullmatch(pattern, s.job.text), s.job.text
        for s in _drive(tok, choice, replace(params, grammar=choice), seed)[:-1]:
            assert s.job.finish_reason == "stop" and s.job.text in choices


def test_max_tokens_cuts_a_held_choice_with_length(grammars, tok):
    person = grammars.get(GrammarKind.JSON_SCHEMA, json.dumps(PERSON))
    (s, _free) = _drive(tok, person, SamplingParams(5, seed=1, grammar=person), 1, rows=1)
    assert s.job.finish_reason == "length" and len(s.ids) == 5 and s.job.text.startswith("{")


# --------------------------------------------------------------------------- the engine


def test_held_requests_in_mixed_steps_beside_other_variants(tiny_dirs, nine_variants, tmp_path):
    """Constrained requests of several variants and the base, with free requests of
    other variants, admitted together (their rows share every step): the constrained
    ones validate, the free ones match the reference of their fine-tune."""
    files, refs = nine_variants
    with serving(tiny_dirs, files, tmp_path, max_batch_size=16, max_new_tokens=128) as srv:
        tok = srv.engine.tokenizer
        vocab = int(srv.engine.model.config.vocab_size)
        table = Grammars(tok, vocab, srv.scheduler.eos)
        person = table.get(GrammarKind.JSON_SCHEMA, json.dumps(PERSON))
        held, free = [], []
        for i, variant in enumerate([None, "v0", "v1", "v2", "v3"]):
            for temperature in (0.0, 1.0):
                params = SamplingParams(120, temperature=temperature, seed=i, grammar=person)
                held.append(request(srv.engine, variant, PROMPTS[i], params))
        for i, variant in enumerate(["v4", "v5", "v6", "v0"]):
            free.append(request(srv.engine, variant, PROMPTS[i]))
        mixed: list[set[bool]] = []
        original = srv.scheduler._run

        def spy(batch):  # which steps had constrained and free rows together
            mixed.append({r.grammar is not None for r in batch.sampling.rows})
            return original(batch)

        srv.scheduler._run = spy  # type: ignore[method-assign]
        run(srv, held + free)
    for r in held:
        assert r.outcome == "done", r.events[-1]
        assert r.job.finish_reason == "stop", r.job.text
        jsonschema.validate(json.loads(r.job.text), PERSON)
        streamed = "".join(p for k, p in r.events if k == "text")
        assert streamed == r.job.text
    for r in free:
        assert_matches_reference(r, refs)
    assert sum(kinds == {True, False} for kinds in mixed) >= 5, "rows shared steps"
