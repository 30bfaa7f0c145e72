"""`deltaserve eval`: how much of a fine-tune's gain did its compressed delta keep?

Scores models a running server serves (variants, and the base for comparison) on a
JSONL task, through the OpenAI API only (a client tool: nothing of the server is
imported), and optionally a local fine-tune directory in-process (--finetune, by
the same rules) for the gain to compare with. Two kinds of rows, mixed freely:

    {"prompt": "What is 12 + 34?", "answer": "46"}
        greedy generation of up to the answer's tokens + 2, exact match of the
        stripped text; the prompt goes through the chat template unless --no-chat
    {"context": "2 + 2 =", "choices": [" 3", " 4"], "label": 1}
        multiple choice by loglikelihood (echo + logprobs, as lm-evaluation-harness)

    deltaserve eval arith --task val.jsonl --finetune ./arith-ft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from deltastore.clihelp import RawHelpFormatter

RETRIES = 5  # a busy server's 429 or 503 is retried, backing off


@dataclass(frozen=True)
class Row:
    prompt: str = ""
    answer: str = ""
    context: str = ""
    choices: tuple[str, ...] = ()
    label: int = -1

    @property
    def choice(self) -> bool:
        return bool(self.choices)


def load_rows(path: Path, limit: int | None = None) -> list[Row]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "choices" in obj:
                choices = tuple(str(c) for c in obj["choices"])
                label = int(obj["label"])
                if not choices or not 0 <= label < len(choices):
                    raise ValueError(f"label {label} is not one of {len(choices)} choices")
                rows.append(Row(context=str(obj["context"]), choices=choices, label=label))
            else:
                rows.append(Row(prompt=str(obj["prompt"]), answer=str(obj["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{i}: need {{prompt, answer}} or {{context, choices, label}} ({e})"
            ) from e
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 300) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(RETRIES + 1):  # a busy server (429, 503) is asked again
            r = self.http.post(path, json=body)
            if r.status_code not in (429, 503) or attempt == RETRIES:
                break
            time.sleep(0.5 * 2**attempt)
        if r.status_code != 200:
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
        out: dict[str, Any] = r.json()
        return out

    def tokens(self, text: str) -> list[int]:
        ids: list[int] = self.post("/tokenize", {"prompt": text, "add_special_tokens": False})[
            "tokens"
        ]
        return ids

    def generate(self, model: str, row: Row, chat: bool) -> bool:
        budget = len(self.tokens(row.answer)) + 2  # the answer and a little more
        common = {"model": model, "max_tokens": budget, "temperature": 0}
        if chat:
            msgs = [{"role": "user", "content": row.prompt}]
            out = self.post("/v1/chat/completions", {**common, "messages": msgs})
            text = out["choices"][0]["message"]["content"]
        else:
            text = self.post("/v1/completions", {**common, "prompt": row.prompt})["choices"][0][
                "text"
            ]
        return bool(text.strip() == row.answer.strip())

    def choose(self, model: str, row: Row) -> bool:
        """The choice whose tokens the model finds most likely after the context."""
        pairs = [encode_pair(self.tokens, row.context, c) for c in row.choices]
        body = {
            "model": model,
            "prompt": [ctx + cont for ctx, cont in pairs],
            "echo": True,
            "logprobs": 0,
            "max_tokens": 0,
        }
        choices = sorted(self.post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        scores = [
            sum(choice["logprobs"]["token_logprobs"][max(len(ctx), 1) :])
            for (ctx, _), choice in zip(pairs, choices, strict=True)
        ]
        return max(range(len(scores)), key=scores.__getitem__) == row.label


def encode_pair(encode: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context and choice tokens, encoded apart so the choice's tokens are exactly
    what is scored (the context's trailing spaces move to the choice, as in
    lm-evaluation-harness). With an empty context the first token has no score."""
    stripped = context.rstrip(" ")
    choice = context[len(stripped) :] + choice
    return (encode(stripped) if stripped else []), encode(choice)


def score_served(client: Client, model: str, rows: list[Row], chat: bool, workers: int) -> float:
    def one(row: Row) -> bool:
        return client.choose(model, row) if row.choice else client.generate(model, row, chat)

    with ThreadPoolExecutor(workers) as pool:
        hits = list(tqdm(pool.map(one, rows), total=len(rows), desc=model, leave=False))
    return sum(hits) / len(rows)


def score_local(model_dir: Path, rows: list[Row], chat: bool) -> float:
    """A local model directory in-process (transformers), by the same rules: the same
    tokenization, token budget and scoring as through the server."""
    import torch

    from deltastore.sources import open_model

    src = open_model(model_dir)
    model, tok = src.load_model().eval(), src.load_tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(text: str) -> list[int]:
        ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        return ids

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    hits = 0
    for row in tqdm(rows, desc=str(model_dir), leave=False):
        if row.choice:
            scores = []
            for ctx, cont in (encode_pair(encode, row.context, c) for c in row.choices):
                ids, lp = ctx + cont, logprobs(ctx + cont)
                scores.append(
                    sum(float(lp[j - 1, ids[j]]) for j in range(max(len(ctx), 1), len(ids)))
                )
            hits += max(range(len(scores)), key=scores.__getitem__) == row.label
            continue
        if chat:  # as the server's chat route: the template's text, no added tokens
            turns = [{"role": "user", "content": row.prompt}]
            ids = encode(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        else:  # as the completions route
            ids = tok(row.prompt)["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.int64),
                max_new_tokens=len(encode(row.answer)) + 2,
                do_sample=False,
                pad_token_id=pad,
            )
        text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        hits += text.strip() == row.answer.strip()
    return hits / len(rows)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("models", nargs="+", help="models the server serves (variants, the base)")
    p.add_argument("--task", type=Path, required=True, help="JSONL rows (see above)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key-env", default="DELTASERVE_API_KEY", help="env var of an API key")
    p.add_argument(
        "--base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the server's base too, for the gain (default: on)",
    )
    p.add_argument("--finetune", type=Path, help="the uncompressed fine-tune, scored in-process")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prompts through the chat template (default: on)",
    )
    p.add_argument("--limit", type=int, help="first N rows only")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests")
    p.add_argument("--json", type=Path, help="also write the scores here")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        rows = load_rows(args.task, args.limit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = Client(args.url, os.environ.get(args.api_key_env))
    try:
        r = client.http.get("/v1/models")
    except httpx.HTTPError as e:
        print(f"error: no server at {args.url} ({e})", file=sys.stderr)
        return 2
    if r.status_code != 200:
        print(
            f"error: {args.url}/v1/models answered {r.status_code}: {r.text[:300]}", file=sys.stderr
        )
        return 2
    served = [m["id"] for m in r.json()["data"]]
    missing = [m for m in args.models if m not in served]
    if missing:
        print(
            f"error: not served: {', '.join(missing)} (served: {', '.join(served)})",
            file=sys.stderr,
        )
        return 2
    base = served[0]  # the base is listed first
    names = ([base] if args.base and base not in args.models else []) + list(args.models)
    scores: dict[str, float] = {}
    try:
        for name in names:
            scores[name] = score_served(client, name, rows, args.chat, args.workers)
        if args.finetune is not None:
            scores[f"{args.finetune} (in-process)"] = score_local(args.finetune, rows, args.chat)
    except (RuntimeError, httpx.HTTPError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    local = f"{args.finetune} (in-process)"
    full = scores.get(local) if args.finetune else None
    print(f"{args.task}: {len(rows)} rows")
    print(f"{'model':40} {'accuracy':>9} {'gain kept':>10}")
    for name, acc in scores.items():
        kept = ""
        if (
            full is not None
            and base in scores
            and full != scores[base]
            and name not in (base, local)
        ):
            kept = f"{(acc - scores[base]) / (full - scores[base]):.0%}"
        print(f"{name:40} {acc:>9.3f} {kept:>10}")
    if args.json:
        args.json.write_text(
            json.dumps({"task": str(args.task), "rows": len(rows), "scores": scores}, indent=2)
            + "\n"
        )
    return 0


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="score served variants (and the base) on a JSONL task: the gain compression kept",
        description=__doc__,
        formatter_class=RawHelpFormatter,
    )
    build_parser(p).set_defaults(func=run)
