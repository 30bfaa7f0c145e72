"""Structured output on the engine's side: grammars compiled against the served
tokenizer, one matcher per choice, and the token bitmask of a step's constrained rows.

The grammar library is llguidance (BENCHMARKS.md, "Structured output": its masks cost
the least per token here, and it depends on nothing else). A `Grammar` is compiled once
per (kind, spec) and kept in `Grammars`' bounded LRU; the HTTP side compiles it when it
validates the request (server/structured.py), off the event loop and off the step loop,
so a bad schema is a 400 and a step never waits for a compilation. Each choice gets its
own `Matcher` (a copy of the compiled grammar's start state, microseconds), advanced on
the worker by every token the choice takes (sequence.py). Per step, the constrained
rows' masks are filled on the host into one (C, W) int32 array, bit t % 32 of word
t // 32 set when token t is allowed; it travels to the device with the step's other
inputs and puts -inf on the other tokens' logits there (sampling.py).

JSON is generated in one line with `json.dumps`'s separators (", " and ": ", no other
whitespace): what the demo fine-tunes were trained on, and a bound on what a choice can
spend on whitespace.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from copy import copy
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# compiled grammars kept (a schema's compilation is ~1 ms; its matcher's lexer grows
# with use and is shared by the choices that copy it)
CACHE_SIZE = 256
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarKind(StrEnum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # spec: the schema, as JSON text
    REGEX = "regex"  # spec: the pattern (the whole output matches it; `\d` is [0-9])
    CHOICE = "choice"  # spec: a JSON list of strings (the output is one of them)


def grammar_text(kind: GrammarKind, spec: str) -> str:
    """llguidance's grammar for (kind, spec); ValueError for a spec it cannot read."""
    if kind == GrammarKind.JSON_OBJECT:
        return str(llg.LLMatcher.grammar_from_json_schema('{"type": "object"}', JSON_OPTIONS))
    if kind == GrammarKind.JSON_SCHEMA:
        return str(llg.LLMatcher.grammar_from_json_schema(spec, JSON_OPTIONS))
    if kind == GrammarKind.REGEX:
        # `\d` is [0-9], as in a JSON schema's patterns (Rust's and Python's would also
        # take the digits of every script); `\w` and `\s` keep Python's meaning
        return str(llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(spec, 'd')}/"))
    if kind == GrammarKind.CHOICE:
        # a Lark alternation of string literals (JSON's escapes are Lark's)
        lark = "start: " + " | ".join(json.dumps(c) for c in json.loads(spec))
        return str(llg.LLMatcher.grammar_from_lark(lark))
    raise ValueError(f"unknown grammar kind {kind!r}; known: {[k.value for k in GrammarKind]}")


def mask_words(vocab: int) -> int:
    """int32 words per row of a bitmask over `vocab` tokens, rounded up to an even count
    (the row then travels as int64 words with the step's other inputs)."""
    return (vocab + 63) // 64 * 2


class Grammars:
    """The served tokenizer as the grammar library reads it, and the compiled grammars
    (an LRU of CACHE_SIZE, keyed by (kind, spec)). Thread-safe: the HTTP side compiles,
    the worker copies."""

    def __init__(
        self, tokenizer: Any, vocab: int, eos: set[int], capacity: int = CACHE_SIZE
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"structured output needs a fast (Rust) tokenizer; {type(tokenizer).__name__} "
                "is not one"
            )
        backend = copy(backend)  # its padding and truncation are not the grammar's
        backend.no_padding()
        backend.no_truncation()
        self.vocab, self.words = vocab, mask_words(vocab)
        # tokens past the tokenizer's (a model's padded vocabulary) are never allowed
        self.tokenizer = llg.LLTokenizer(
            backend.to_str(), n_vocab=self.words * 32, eos_token=sorted(eos) or None
        )
        self.capacity = capacity
        self.executor = llg.LLExecutor(1)  # masks on the worker's thread (it waits anyway)
        self._cache: OrderedDict[tuple[GrammarKind, str], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: GrammarKind, spec: str) -> Grammar:
        """The compiled grammar of (kind, spec), compiled on a miss (touches LRU order);
        ValueError, with the library's reason, for a grammar that does not compile."""
        key = (kind, spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = self._compile(kind, spec)  # outside the lock: others' hits do not wait
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, kind: GrammarKind, spec: str) -> Grammar:
        try:
            text = grammar_text(kind, spec)
            start = llg.LLMatcher(self.tokenizer, text, log_level=0)
        except Exception as e:  # the library's words for what it cannot read
            raise ValueError(str(e)) from e
        if start.is_error():
            raise ValueError(start.get_error())
        return Grammar(kind, start, self)

    def __len__(self) -> int:
        return len(self._cache)


class Grammar:
    """A compiled grammar: its start state, copied for every choice held to it."""

    def __init__(self, kind: GrammarKind, start: Any, owner: Grammars) -> None:
        self.kind, self._start, self.owner = kind, start, owner

    def matcher(self) -> Matcher:
        return Matcher(self._start.deep_copy(), self.owner)


class Matcher:
    """One choice's place in its grammar."""

    def __init__(self, state: Any, owner: Grammars) -> None:
        self.state, self.owner = state, owner

    def advance(self, token: int) -> None:
        """Take a sampled token; ValueError for one the grammar does not allow (the mask
        let it through: a bug, never the model's doing)."""
        if not self.state.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.state.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more (only an end token)."""
        return bool(self.state.is_stopped())


def fill_bitmask(matchers: list[Matcher]) -> np.ndarray:
    """(C, W) int32: row i the tokens matchers[i] allows next (bit t % 32 of word t // 32)."""
    owner = matchers[0].owner
    out = np.zeros((len(matchers), owner.words), dtype=np.int32)
    assert all(m.owner is owner for m in matchers), "one tokenizer per server"
    targets = [(m.state, i) for i, m in enumerate(matchers)]
    owner.executor.unsafe_compute_mask_ptr(targets, out.ctypes.data, owner.words * 4, len(matchers))
    return out
