"""Incremental detokenization (server/engine/detokenizer.py): what a sequence streams
adds up to a full decode of its tokens, whatever the token boundaries inside a
multi-byte character, and single tokens' bytes add up to the text they make."""

from __future__ import annotations

import random

from deltastore.testing import tiny_tokenizer
from server.engine.detokenizer import TokenTexts
from server.engine.job import TokenLogprob

TOK = tiny_tokenizer()
EOS = 256


def _stream(ids: list[int]) -> list[str]:
    detok = TokenTexts(TOK).detokenizer()
    return [detok.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


def test_multi_byte_characters_split_over_tokens_come_out_whole():
    text = "naïve café – 東京 🙂 done"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # byte-level: the characters above span several tokens
    chunks = _stream(ids)
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)  # never half a character


def test_streamed_text_is_the_full_decode_of_any_token_sequence():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(258) for _ in range(rng.randrange(1, 24))]
        assert "".join(_stream(ids)) == TOK.decode(ids, skip_special_tokens=True)


def test_special_tokens_add_no_text():
    ids = TOK("ab", add_special_tokens=False)["input_ids"]
    assert "".join(_stream([ids[0], EOS, ids[1]])) == "ab"


def test_single_tokens_texts_and_bytes():
    texts = TokenTexts(TOK)
    ids = TOK("é!", add_special_tokens=False)["input_ids"]
    assert [texts.text(t) for t in ids] == [TOK.decode([t]) for t in ids]
    assert bytes(b for t in ids for b in texts.bytes(t)).decode() == "é!"
    entry = texts.label(TokenLogprob(ids[0], -0.5, ((ids[1], -1.0),)))
    assert entry.texts() == {ids[0]: texts.piece(ids[0]), ids[1]: texts.piece(ids[1])}
