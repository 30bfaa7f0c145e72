"""The OpenAI surface beyond plain text: logprobs (streamed too), echo with prompt
logprobs, token-id and listed prompts, n, the sampling options, chat content parts,
models.retrieve, /tokenize, system_fingerprint. Each is checked against the same
weights loaded in transformers (the fine-tune materialized), on both engines."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path

import openai
import pytest
import torch

from deltastore.sources import open_model

PROMPT = "the cat sat on"
TOL = 1e-4  # fp32 on both sides; the engines' sums run in another order


@cache
def _hf(model_dir: Path):
    src = open_model(model_dir)
    return src.load_model().eval(), src.load_tokenizer()


def _logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `ids` (transformers)."""
    model, _ = _hf(model_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def _greedy(
    model_dir: Path,
    ids: list[int],
    steps: int,
    process: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (processed logits' argmax) and the raw log-probabilities per step."""
    out: list[int] = []
    lps = []
    for _ in range(steps):
        lp = _logprobs(model_dir, ids + out)[-1]
        lps.append(lp)
        x = process(lp.clone(), out) if process else lp
        out.append(int(x.argmax()))
    return out, lps


def _tok(live):
    return live.state.engine.tokenizer


def _post(live, path, body, status=200):
    r = live.client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def _oai(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("variant", [None, "v1"])
def test_logprobs_of_generated_tokens_are_the_models(live, materialized, variant):
    model = variant or live.state.base_name
    ids = _tok(live)(PROMPT)["input_ids"]
    want, lps = _greedy(materialized[variant], ids, 6)
    got = _post(
        live,
        "/v1/completions",
        {
            "model": model,
            "prompt": ids,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 3,
            "ignore_eos": True,
        },
    )["choices"][0]
    lp = got["logprobs"]
    decode = _tok(live).decode
    assert lp["tokens"] == [decode([t]) for t in want]
    assert got["text"] == decode(want, skip_special_tokens=True)
    for step, (t, row) in enumerate(zip(want, lps, strict=True)):
        assert math.isclose(lp["token_logprobs"][step], float(row[t]), abs_tol=TOL)
        values, top = torch.topk(row, 3)
        expect = {decode([t]): float(row[t])}  # the chosen token, then the best first
        for i, v in zip(top, values, strict=True):  # (tokens with one text keep the best)
            expect.setdefault(decode([int(i)]), float(v))
        assert lp["top_logprobs"][step].keys() >= expect.keys()
        for k, v in expect.items():
            assert math.isclose(lp["top_logprobs"][step][k], v, abs_tol=TOL)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(
        b - a == len(s) for a, b, s in zip(offsets, offsets[1:], lp["tokens"], strict=False)
    )


@pytest.mark.parametrize("variant", [None, "v2"])
def test_echo_scores_the_prompt_as_lm_eval_asks(live, materialized, variant):
    """lm-evaluation-harness's loglikelihood request: token-id prompts in a batch,
    echo, logprobs 1, max_tokens 1 (and 0); token_logprobs[ctxlen:-1] is the score."""
    model = variant or live.state.base_name
    tok = _tok(live)
    prompts = [tok(p)["input_ids"] for p in ("the cat sat on a mat", "ran then", "a")]
    for max_tokens in (0, 1):
        out = _post(
            live,
            "/v1/completions",
            {
                "model": model,
                "prompt": prompts,
                "echo": True,
                "logprobs": 1,
                "max_tokens": max_tokens,
                "temperature": 0,
                "seed": 1234,
            },
        )
        choices = sorted(out["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        for ids, choice in zip(prompts, choices, strict=True):
            lp = choice["logprobs"]
            ref = _logprobs(materialized[variant], ids)
            assert lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            for j in range(1, len(ids)):
                assert math.isclose(lp["token_logprobs"][j], float(ref[j - 1, ids[j]]), abs_tol=TOL)
                greedy = int(ref[j - 1].argmax()) == ids[j]
                assert (lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values())) == greedy
            assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=True))
            if max_tokens == 0:
                assert len(lp["tokens"]) == len(ids) and choice["finish_reason"] == "length"
            else:
                assert len(lp["tokens"]) == len(ids) + 1
                assert math.isclose(lp["token_logprobs"][-1], float(ref[-1].max()), abs_tol=TOL)
        usage = out["usage"]
        assert usage["prompt_tokens"] == sum(len(p) for p in prompts)


def _stream(live, path, body):
    r = live.client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e[len("data: ") :] for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_logprobs_join_to_the_non_streamed(live):
    body = {
        "model": "v3",
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
        "n": 2,
        "seed": 3,
    }
    plain = _post(live, "/v1/completions", body)["choices"]
    chunks = _stream(live, "/v1/completions", body)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == plain[i]["text"]
        joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "text_offset": []}
        for c in mine:
            for key in joined:
                joined[key] += (c["logprobs"] or {}).get(key, [])
        for key in joined:
            assert joined[key] == plain[i]["logprobs"][key], key
        assert mine[-1]["finish_reason"] == plain[i]["finish_reason"]


def test_chat_logprobs_and_content_parts(live, materialized):
    base = {"model": "v0", "max_tokens": 6, "temperature": 0}
    text = {"messages": [{"role": "user", "content": "the cat"}]}
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "cat"}],
            }
        ]
    }
    a = _post(live, "/v1/chat/completions", {**base, **text})
    b = _post(live, "/v1/chat/completions", {**base, **parts, "logprobs": True, "top_logprobs": 2})
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    content = b["choices"][0]["logprobs"]["content"]
    ids = _post(live, "/tokenize", {**text, "model": "v0"})["tokens"]
    want, lps = _greedy(materialized["v0"], ids, len(content))
    for entry, t, row in zip(content, want, lps, strict=True):
        assert entry["token"] == _tok(live).decode([t])
        assert len(entry["bytes"]) == 1 or entry["token"] == "<eos>"  # one byte per token
        assert math.isclose(entry["logprob"], float(row[t]), abs_tol=TOL)
        assert len(entry["top_logprobs"]) == 2
        assert math.isclose(entry["top_logprobs"][0]["logprob"], float(row.max()), abs_tol=TOL)
    raw = b"".join(bytes(e["bytes"]) for e in content if e["token"] != "<eos>")
    assert raw.decode("utf-8", errors="replace") == b["choices"][0]["message"]["content"]
    chunks = _stream(
        live, "/v1/chat/completions", {**base, **parts, "logprobs": True, "top_logprobs": 2}
    )
    streamed = [
        e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])
    ]
    assert streamed == content
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == b["choices"][0]["message"]["content"]
    )


# --------------------------------------------------------------------------- prompts, n


def test_token_ids_prompt_lists_and_n(live):
    tok = _tok(live)
    greedy = {"model": "v4", "max_tokens": 8, "temperature": 0}
    texts = ["the cat", "on a mat", "ran"]
    singles = [
        _post(live, "/v1/completions", {**greedy, "prompt": t})["choices"][0]["text"] for t in texts
    ]
    by_ids = _post(live, "/v1/completions", {**greedy, "prompt": tok(texts[0])["input_ids"]})
    assert by_ids["choices"][0]["text"] == singles[0]
    listed = _post(live, "/v1/completions", {**greedy, "prompt": texts})
    assert [c["index"] for c in listed["choices"]] == [0, 1, 2]
    assert [c["text"] for c in listed["choices"]] == singles
    mixed = _post(
        live, "/v1/completions", {**greedy, "prompt": [tok(t)["input_ids"] for t in texts]}
    )
    assert [c["text"] for c in mixed["choices"]] == singles

    sampled = {
        "model": "v4",
        "prompt": texts[:2],
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "ignore_eos": True,
    }
    many = _post(live, "/v1/completions", sampled)
    assert [c["index"] for c in many["choices"]] == list(range(6))
    again = _post(live, "/v1/completions", sampled)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in many["choices"]]
    for i, prompt in enumerate(texts[:2]):
        for j in range(3):  # choice j of a seeded request is that of seed + j alone
            one = _post(
                live, "/v1/completions", {**sampled, "prompt": prompt, "n": 1, "seed": 11 + j}
            )
            assert one["choices"][0]["text"] == many["choices"][i * 3 + j]["text"]
    assert len({c["text"] for c in many["choices"][:3]}) > 1  # the choices differ
    echo = {**greedy, "echo": True, "max_tokens": 0}
    as_sent = _post(live, "/v1/completions", {**echo, "prompt": "the  cat "})["choices"][0]
    assert as_sent["text"] == "the  cat "  # the text as sent
    by_ids = _post(live, "/v1/completions", {**echo, "prompt": [5, 6]})["choices"][0]
    assert by_ids["text"] == tok.decode([5, 6])
    assert many["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in texts[:2])
    assert many["usage"]["completion_tokens"] == 6 * 8  # ignore_eos: every choice is full

    chunks = _stream(
        live, "/v1/completions", {**sampled, "stream_options": {"include_usage": True}}
    )
    for k in range(6):
        joined = "".join(
            c["choices"][0]["text"]
            for c in chunks
            if c["choices"] and c["choices"][0]["index"] == k
        )
        assert joined == many["choices"][k]["text"]
    assert chunks[-1]["usage"] == many["usage"]


# --------------------------------------------------------------------------- sampling


def _penalized(rep=1.0, freq=0.0, pres=0.0, prompt=()):
    """The OpenAI/vLLM formulas, written out here as the oracle."""

    def process(x: torch.Tensor, out: list[int]) -> torch.Tensor:
        seen = sorted(set(prompt) | set(out))
        if rep != 1.0 and seen:
            v = x[seen]
            x[seen] = torch.where(v > 0, v / rep, v * rep)
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        return x

    return process


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.3, "frequency_penalty": 0.7, "presence_penalty": -0.5},
    ],
)
def test_penalties_match_the_formulas(live, materialized, options):
    ids = _tok(live)("the cat sat on the mat the cat")["input_ids"]
    # the oracle: transformers' raw logits, penalized by the formulas, argmax
    model, _ = _hf(materialized["v2"])
    proc = _penalized(
        options.get("repetition_penalty", 1.0),
        options.get("frequency_penalty", 0),
        options.get("presence_penalty", 0),
        prompt=ids,
    )
    out: list[int] = []
    for _ in range(10):
        with torch.inference_mode():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        out.append(int(proc(logits.clone(), out).argmax()))
    got = _post(
        live,
        "/v1/completions",
        {
            "model": "v2",
            "prompt": ids,
            "max_tokens": 10,
            "temperature": 0,
            "ignore_eos": True,
            **options,
        },
    )
    assert got["choices"][0]["text"] == _tok(live).decode(out, skip_special_tokens=True)
    plain = _post(
        live,
        "/v1/completions",
        {"model": "v2", "prompt": ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
    )
    assert plain["choices"][0]["text"] != got["choices"][0]["text"]  # the option did something


def test_top_k_min_p_stop_token_ids_min_tokens(live, materialized):
    ids = _tok(live)(PROMPT)["input_ids"]
    greedy, _ = _greedy(materialized["v1"], ids, 8)
    decode = _tok(live).decode
    base = {"model": "v1", "prompt": ids, "max_tokens": 8, "ignore_eos": True}
    want = decode(greedy, skip_special_tokens=True)
    # one token left to sample from: any temperature and seed gives the greedy text
    for opts in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            got = _post(live, "/v1/completions", {**base, **opts, "temperature": 1.5, "seed": seed})
            assert got["choices"][0]["text"] == want, opts
    wide = {**base, "temperature": 1.5, "top_k": 50, "min_p": 0.01}
    texts = {
        _post(live, "/v1/completions", {**wide, "seed": s})["choices"][0]["text"] for s in range(4)
    }
    assert len(texts) > 1  # still sampling
    # a stop token id ends the choice before it, like end of sequence
    k = next(i for i in range(2, 8) if greedy[i] not in greedy[:i])
    stopped = _post(
        live, "/v1/completions", {**base, "temperature": 0, "stop_token_ids": [greedy[k]]}
    )["choices"][0]
    assert stopped["text"] == decode(greedy[:k], skip_special_tokens=True)
    assert stopped["finish_reason"] == "stop"
    # min_tokens holds it off: the first 3 tokens cannot be the stop token
    first = greedy[0]
    held = _post(
        live,
        "/v1/completions",
        {
            **base,
            "temperature": 0,
            "max_tokens": 5,
            "stop_token_ids": [first],
            "min_tokens": 3,
            "logprobs": 0,
        },
    )["choices"][0]
    assert len(held["logprobs"]["tokens"]) >= 3
    mask = _penalized()

    def no_first(x, out):
        if len(out) < 3:
            x[first] = float("-inf")
        return mask(x, out)

    expect, _ = _greedy(materialized["v1"], ids, 5, no_first)
    cut = next((i for i, t in enumerate(expect) if i >= 3 and t == first), 5)
    assert held["text"] == decode(expect[:cut], skip_special_tokens=True)


# --------------------------------------------------------------------------- the rest


def test_models_retrieve_tokenize_and_fingerprints(live, variant_files):
    client = _oai(live)
    v0 = client.models.retrieve("v0")
    extra = v0.model_extra or {}
    assert v0.id == "v0" and extra["max_model_len"] == 256
    assert extra["parent"] == live.state.base_name
    delta = extra["delta"]
    assert delta["method"] == "darex-q" and delta["rate"] == 0.5 and delta["q"] == 0.7
    assert delta["size_bytes"] == variant_files["v0"].stat().st_size > 0
    base = client.models.retrieve(live.state.base_name)
    assert (base.model_extra or {}).get("delta") is None
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")

    tok = _tok(live)
    t = _post(live, "/tokenize", {"model": "v0", "prompt": PROMPT, "return_token_strs": True})
    assert t["tokens"] == tok(PROMPT)["input_ids"] and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 256 and t["token_strs"] == [tok.decode([i]) for i in t["tokens"]]
    assert _post(live, "/detokenize", {"tokens": t["tokens"]})["prompt"] == tok.decode(t["tokens"])
    _post(live, "/detokenize", {"tokens": [10**9]}, status=400)
    _post(live, "/tokenize", {"model": "missing", "prompt": "x"}, status=404)
    _post(live, "/tokenize", {}, status=400)
    info = live.client.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 256

    def fp(model):
        body = {"model": model, "prompt": "a", "max_tokens": 1}
        return _post(live, "/v1/completions", body)["system_fingerprint"]

    prints = {m: fp(m) for m in (live.state.base_name, "v0", "v1")}
    assert len(set(prints.values())) == 3 and all(p.startswith("fp_") for p in prints.values())
    assert fp("v0") == prints["v0"]
    # replaced by another delta: another fingerprint
    r = live.admin.post(
        "/admin/deltas",
        params={"name": "v0", "replace": "true"},
        content=variant_files["v1"].read_bytes(),
    )
    assert r.status_code in (200, 201), r.text
    assert fp("v0") == prints["v1"]


def test_the_openai_client_exercises_every_option(live):
    exercise_openai_client(live.url)


def exercise_openai_client(url: str) -> None:
    """Every option through the official client, streamed and not (also run through
    the Ray ingress, tests/server/test_ray.py)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    extra = {
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop_token_ids": [3],
        "ignore_eos": False,
        "min_tokens": 1,
    }
    completion = {
        "model": "v1",
        "prompt": ["the cat", "a mat"],
        "max_tokens": 6,
        "temperature": 0.8,
        "top_p": 0.9,
        "n": 2,
        "seed": 5,
        "logprobs": 2,
        "echo": True,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.2,
        "stop": ["zzz"],
        "extra_body": extra,
    }
    c = client.completions.create(**completion)
    assert len(c.choices) == 4 and c.system_fingerprint and c.usage.completion_tokens > 0
    assert all(ch.logprobs and ch.logprobs.token_logprobs[0] is None for ch in c.choices)
    again = client.completions.create(**completion)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**completion, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert [streamed[i] for i in range(4)] == [ch.text for ch in c.choices]

    chat_options = {
        "model": "v2",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 5,
        "temperature": 0.7,
        "seed": 9,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.1,
        "extra_body": extra,
    }
    chat = client.chat.completions.create(**chat_options)
    assert len(chat.choices) == 2 and chat.system_fingerprint
    assert all(len(e.top_logprobs) == 3 for ch in chat.choices for e in ch.logprobs.content)
    joined: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        **chat_options, stream=True, stream_options={"include_usage": True}
    ):
        for ch in chunk.choices:
            joined[ch.index] = joined.get(ch.index, "") + (ch.delta.content or "")
        if chunk.usage:
            assert chunk.usage.completion_tokens == chat.usage.completion_tokens
    assert [joined[i] for i in range(2)] == [ch.message.content for ch in chat.choices]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model="v1", prompt="x" * 250, max_tokens=20)
