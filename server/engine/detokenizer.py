"""Token ids -> text, on the worker: one incremental detokenizer per sequence, and the
texts of single tokens (logprobs) from one cache per server.

`Detokenizer` follows vLLM's incremental detokenization: each generated id becomes its
vocabulary piece once; the text a new token adds is the decoded window
`pieces[prefix:]` less the decoded window `pieces[prefix:read]` (the earlier pieces
give context, so leading spaces and characters split over several byte-level tokens
come out as a full decode would). A window that ends in an incomplete UTF-8 character
(U+FFFD) waits for the next token, unless the sequence ends there.

`TokenTexts` holds each token's own text and bytes, decoded once per id and kept: the
worker labels logprob entries with them, the HTTP side reads them for /tokenize.

The server has one tokenizer, loaded once (`settle`d so that the HTTP side's encoding
never changes it): the worker reads it (pieces, decoder) while the HTTP side encodes
with it, one caller at a time (server/state.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from server.engine.job import Piece, TokenLogprob

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 character


def settle(tokenizer: Any) -> Any:
    """Clear a fast tokenizer's truncation and padding once, so that no later call
    (an encode without truncation or padding) rewrites them while the worker decodes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
    return tokenizer


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids `decode(..., skip_special_tokens=True)` leaves out: the added tokens
    marked special (what the Rust tokenizer skips)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(i for i, t in added.items() if getattr(t, "special", False))


class Detokenizer:
    """One sequence's generated text, token by token."""

    def __init__(self, tokenizer: Any, skip: frozenset[int]) -> None:
        self.tokenizer, self.skip = tokenizer, skip
        self.pieces: list[str] = []  # the vocabulary pieces of the generated tokens
        self.prefix = self.read = 0  # pieces[prefix:read]: the context already emitted

    def add(self, token: int | None, final: bool = False) -> str:
        """The text `token` adds (None: no token, only `final`). An incomplete character
        waits for the next token, unless this is the last."""
        if token is not None and token not in self.skip:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if piece is not None:
                self.pieces.append(piece)
        decode = self.tokenizer.convert_tokens_to_string
        before = decode(self.pieces[self.prefix : self.read]) if self.read > self.prefix else ""
        after = decode(self.pieces[self.prefix :]) if len(self.pieces) > self.prefix else ""
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.prefix, self.read = self.read, len(self.pieces)
            return after[len(before) :]
        return ""


class TokenTexts:
    """Each token's own text (`decode([id])`) and bytes (a byte-level BPE token's raw
    bytes, so that the pieces of one multi-byte character add up to it), decoded once
    per id. Reads and writes of its dicts are atomic, so the worker and the HTTP side
    share it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.skip = special_ids(tokenizer)
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, tuple[int, ...]] = {}
        backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(backend).__name__ == "ByteLevel"

    def detokenizer(self) -> Detokenizer:
        """A new sequence's detokenizer."""
        return Detokenizer(self.tokenizer, self.skip)

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = str(self.tokenizer.decode([token]))
        return text

    def bytes(self, token: int) -> tuple[int, ...]:
        raw = self._bytes.get(token)
        if raw is None:
            raw = self._bytes[token] = self._piece_bytes(token)
        return raw

    def piece(self, token: int) -> Piece:
        return Piece(self.text(token), self.bytes(token))

    def label(self, entry: TokenLogprob) -> TokenLogprob:
        """The entry with the pieces of its token and of its alternatives."""
        tokens = (entry.token, *(t for t, _ in entry.top))
        return replace(entry, pieces=tuple(self.piece(t) for t in tokens))

    def _piece_bytes(self, token: int) -> tuple[int, ...]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece and piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return (int(piece[3:5], 16),)  # a sentencepiece byte-fallback piece
        if piece and self._byte_level and all(c in BYTE_DECODER for c in piece):
            return tuple(BYTE_DECODER[c] for c in piece)
        if piece and "\u2581" in piece:  # sentencepiece's word boundary
            return tuple(piece.replace("\u2581", " ").encode())
        return tuple(self.text(token).encode())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (byte-level BPE tokenizers)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


BYTE_DECODER = _byte_decoder()
