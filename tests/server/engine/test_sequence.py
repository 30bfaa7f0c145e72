"""A sequence's text (server/engine/sequence.py): stop strings are searched across
tokens, the text that could still begin one is held back from the stream, and what is
streamed always adds up to the final text."""

from __future__ import annotations

from typing import Any

from deltastore.testing import tiny_tokenizer
from server.engine.job import Job, SamplingParams
from server.engine.sequence import Sequence

TOK = tiny_tokenizer()
EOS = 256


def _run(text: str, **params: Any) -> tuple[Job, list[str], list[str]]:
    """Feed `text` token by token; the job, the chunks streamed, and the text streamed
    so far after each token."""
    chunks: list[str] = []
    job = Job(
        None,
        [1],
        SamplingParams(**{"max_tokens": 64, **params}),
        lambda k, p: chunks.append(p) if k == "text" else None,
    )
    seq = Sequence(job, 0, TOK, {EOS})
    seen = []
    for t in TOK(text, add_special_tokens=False)["input_ids"]:
        if seq.done:
            break
        seq.add(t)
        seen.append("".join(chunks))
    return job, chunks, seen


def test_a_stop_string_ends_the_text_before_it_and_never_streams_its_start():
    job, chunks, seen = _run("the cat sat", stop=("cat",))
    assert job.finish_reason == "stop" and job.text == "the "
    assert "".join(chunks) == "the "
    # while "c" and "ca" could still begin "cat", they were never streamed
    assert all("c" not in s for s in seen)


def test_held_text_is_released_when_no_stop_follows():
    job, chunks, seen = _run("the cab and", stop=("cat",), max_tokens=11)
    assert job.finish_reason == "length" and job.text == "the cab and"
    assert "".join(chunks) == job.text  # the held tail went out at the end
    # two characters (len("cat") - 1) were held back at every step until the end
    assert seen[6] == "the c" and seen[9] == "the cab "


def test_the_earliest_of_several_stops_wins_even_across_tokens():
    job, chunks, _ = _run("x sat on the mat", stop=("the mat", "on", "zzz"))
    assert job.text == "x sat " and "".join(chunks) == job.text


def test_no_stop_before_min_tokens_and_end_tokens_stop():
    job, _, _ = _run("ab ab ab", stop=("ab",), min_tokens=4)
    assert job.text == "ab "  # the first "ab" ended before min_tokens: kept; the second stops
    chunks: list[str] = []
    end = Job(
        None,
        [1],
        SamplingParams(max_tokens=8),
        lambda k, p: chunks.append(p) if k == "text" else None,
    )
    seq = Sequence(end, 0, TOK, {EOS})
    for t in TOK("hi", add_special_tokens=False)["input_ids"]:
        seq.add(t)
    seq.add(EOS)
    assert end.finish_reason == "stop" and end.text == "hi" and end.completion_tokens == 2
