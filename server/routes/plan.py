"""What a completion request asks the engine for, checked against what the server
allows: prompt ids (text, ids, or chat messages through the template), the completion
budget per prompt (max tokens within the context), and each choice's sampling
parameters. Errors are 400s in vLLM's and OpenAI's words, naming the field at fault.
"""

from __future__ import annotations

from typing import Any

from server.engine.grammar import Grammar
from server.engine.job import SamplingParams
from server.errors import APIError
from server.schemas import MAX_PROMPTS, SEED_MAX, SEED_MIN, ChatMessage, SamplingFields
from server.state import AppState

COMPLETION_DEFAULT = 16  # OpenAI's default for /v1/completions
# A prompt longer than this many characters per allowed token is refused before it
# is tokenized (a token of this tokenizer family is rarely over 16 characters).
CHARS_PER_TOKEN_BOUND = 32


def check_chars(state: AppState, n_chars: int, param: str) -> None:
    """A prompt too long to hold the allowed tokens, refused before it is tokenized."""
    tokens = state.settings.max_prompt_tokens
    if n_chars > tokens * CHARS_PER_TOKEN_BOUND:
        raise APIError(
            400,
            f"This server's maximum prompt length is {tokens} tokens. However, your request "
            f"has {n_chars} characters, more than {tokens} tokens hold (at most "
            f"{CHARS_PER_TOKEN_BOUND} characters per token). {REDUCE}",
            "context_length_exceeded",
            param,
        )


REDUCE = "Please reduce the length of the input messages."


def prompt_too_long(state: AppState, engine: Any, n_prompt: int, param: str) -> APIError:
    """vLLM's words for a prompt beyond the context (or beyond --max-prompt-tokens)."""
    limit = max_model_len(state, engine)
    what = (
        f"This model's maximum context length is {limit} tokens"
        if n_prompt >= limit
        else f"This server's maximum prompt length is {state.settings.max_prompt_tokens} tokens"
    )
    return APIError(
        400,
        f"{what}. However, your request has {n_prompt} input tokens. {REDUCE}",
        "context_length_exceeded",
        param,
    )


def check_options(req: SamplingFields) -> None:
    bad = req.unsupported()
    if bad:
        raise APIError(
            400, f"unsupported option(s): {', '.join(bad)}", "unsupported_option", bad[0]
        )


def max_model_len(state: AppState, engine: Any) -> int:
    """The longest prompt plus completion a request may ask for."""
    s = state.settings
    return int(min(engine.max_positions, s.max_prompt_tokens + s.max_new_tokens))


def vocab(engine: Any) -> int:
    return int(engine.model.get_input_embeddings().weight.shape[0])


def check_ids(ids: list[int], vocab: int, what: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"{what}: token id {bad} is outside the vocabulary [0, {vocab})", what, what
        )


def max_tokens(
    state: AppState,
    engine: Any,
    n_prompt: int,
    wanted: int | None,
    default: int,
    prompt_param: str = "prompt",
    tokens_param: str = "max_tokens",
) -> int:
    """The completion budget of one prompt: `wanted`, or the default within the context.
    A prompt, or a prompt and completion, beyond the context is a 400
    `context_length_exceeded` in vLLM's words, naming the field to shorten."""
    s = state.settings
    if wanted is not None and wanted > s.max_new_tokens:
        raise APIError(
            400,
            f"{tokens_param} {wanted} exceeds this server's {s.max_new_tokens}",
            "max_tokens",
            tokens_param,
        )
    limit = max_model_len(state, engine)
    if n_prompt > s.max_prompt_tokens or n_prompt + int(wanted != 0) > limit:
        raise prompt_too_long(state, engine, n_prompt, prompt_param)
    budget = wanted if wanted is not None else min(default, s.max_new_tokens, limit - n_prompt)
    if n_prompt + budget > limit:
        raise APIError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {budget}. This model's "
            f"maximum context length is {limit} tokens and your request has {n_prompt} input "
            f"tokens ({budget} > {limit} - {n_prompt}).",
            "context_length_exceeded",
            tokens_param,
        )
    return budget


def params(
    state: AppState,
    engine: Any,
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    grammar: Grammar | None = None,
) -> SamplingParams:
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens {req.min_tokens} exceeds max_tokens {max_tokens}",
            "min_tokens",
            "min_tokens",
        )
    stop_ids = tuple(req.stop_token_ids or ())
    check_ids(list(stop_ids), vocab(engine), "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's seed plus j (wrapped to 64 bits), so a seeded
    request is reproducible choice by choice and its first choice is that of n = 1."""
    if seed is None:
        return None
    return (seed + j - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


async def chat_ids(state: AppState, messages: list[ChatMessage], generation: bool) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "the base has no chat template: use /v1/completions", "no_template")
    check_chars(state, sum(len(m.text()) for m in messages), "messages")
    turns = [{"role": m.role, "content": m.text()} for m in messages]

    def encode(tok: Any) -> list[int]:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
        ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        return ids

    return await state.tokenize(encode)


async def prompt_ids(
    state: AppState, engine: Any, prompt: Any
) -> tuple[list[list[int]], list[str | None]]:
    """A completion request's prompts as token ids (text, ids, or a list of either),
    and each prompt's text as sent (None: given as ids)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: an empty list", "empty_prompt", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(
            400, f"prompt: at most {MAX_PROMPTS} prompts per request", "too_many_prompts", "prompt"
        )
    texts = [p for p in prompts if isinstance(p, str)]
    check_chars(state, max((len(t) for t in texts), default=0), "prompt")
    encoded = iter(
        await state.tokenize(lambda tok: [tok(t)["input_ids"] for t in texts]) if texts else []
    )
    out = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
    n_vocab = vocab(engine)
    for ids in out:
        if not ids:
            raise APIError(400, "prompt: an empty prompt", "empty_prompt", "prompt")
        check_ids(ids, n_vocab, "prompt")
    return out, [p if isinstance(p, str) else None for p in prompts]
