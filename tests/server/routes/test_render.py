"""A stream's text chunks written directly (Head.text_chunk, the path most of a stream
takes) are the bytes the response models make (Head.chunk), for chat and completions,
whatever the text holds."""

from __future__ import annotations

import json

import pytest

from server.routes.render import Head
from server.schemas import ChatDelta, ChatStreamChoice, CompletionChoice

TEXTS = [
    "Hello",
    " world",
    'a "quoted" \\ back\\slash',
    "new\nline\ttab\rreturn\b\f",
    "".join(chr(c) for c in range(32)) + "\x7f",
    "émoji 🚀 CJK 漢字 \u2028\u2029 </script>",
    "{}[],:",
]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("fingerprint", [None, "fp_1"])
@pytest.mark.parametrize("text", TEXTS)
def test_text_chunk_is_the_models_chunk(chat, fingerprint, text):
    head = Head('cmpl-"x"', 1700000000, "acme/v1 ünï", fingerprint, chat)
    for index in (0, 3):
        if chat:
            choice: ChatStreamChoice | CompletionChoice = ChatStreamChoice(
                index=index, delta=ChatDelta(content=text), finish_reason=None
            )
        else:
            choice = CompletionChoice(index=index, text=text, finish_reason=None)
        want = head.chunk([choice])
        assert head.text_chunk(index, text) == want
        assert want.startswith("data: ") and want.endswith("\n\n")
        body = json.loads(want[len("data: ") :])
        got = body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]
        assert got == text
