"""Seconds per fine-tune step on the embedded base: the model's own loss (head over
every position) against the answer-only head, bf16 autocast and a frozen embedding.

    python -m benchmarks.finetune_step [--steps 5] [--task extract]

Each variant loads the base afresh, takes the same batches (batch 8 of the task's
training rows through the chat template) and times forward + backward + AdamW
step; the first step is a warm-up and is not counted. Prints the median per
variant and its ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from deltastore.embedded import ensure_embedded_base
from deltastore.finetune import FinetuneConfig, answer_loss, encode_all, pad_batch
from deltastore.sources import open_model
from deltastore.tasks import splits

RESULTS = Path(__file__).parent / "results" / "finetune_step.json"
VARIANTS = {
    "model loss, fp32 (before)": dict(answer_only=False, bf16=False, freeze=False),
    "answer-only head, fp32": dict(answer_only=True, bf16=False, freeze=False),
    "answer-only head, frozen embedding": dict(answer_only=True, bf16=False, freeze=True),
    "answer-only head, frozen embedding, bf16 (demos)": dict(
        answer_only=True, bf16=True, freeze=True
    ),
}


def step_times(source, batches, answer_only: bool, bf16: bool, freeze: bool) -> list[float]:
    torch.manual_seed(0)
    model = source.load_model(torch.float32)
    if freeze:
        model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True
    )
    times = []
    for batch in batches:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, batch) if answer_only else model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--task", default="extract", help="arith | extract | topic")
    args = ap.parse_args(argv)
    source = open_model(ensure_embedded_base())
    tokenizer = source.load_tokenizer()
    train = splits(args.task)[0]
    rng = random.Random(0)
    rows = encode_all(tokenizer, train, FinetuneConfig())
    batches = [
        pad_batch(rng.sample(rows, 8), tokenizer.eos_token_id) for _ in range(args.steps + 1)
    ]
    out = {"task": args.task, "threads": torch.get_num_threads(), "machine": platform.machine()}
    first = None
    for name, kw in VARIANTS.items():
        median = statistics.median(step_times(source, batches, **kw))
        first = first or median
        out[name] = round(median, 3)
        print(f"{name:52s} {median:6.2f} s/step  {first / median:4.2f}x", flush=True)
    print(json.dumps(out))
    runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([*runs, out], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
