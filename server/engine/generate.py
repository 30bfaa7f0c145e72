"""Batched generation for requests of one variant: left-padded prefill, then one
token per step for every row, with each request's own sampling, stop strings and
token limit. Text streams out as it is decoded; a cancelled request stops at the
next step."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache

from server.engine.job import INTERNAL, Job
from server.engine.sampling import Row, SamplingBatch, ScoreRows, sample_on_host, sample_rows
from server.engine.sequence import Sequence, end_token_ids

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, jobs: list[Job], device: torch.device) -> None:
    """Run `jobs` (one variant) to completion; each finishes on its own."""
    eos = end_token_ids(model, tokenizer)
    vocab = int(model.config.vocab_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    rows = [Sequence(j, -1, tokenizer, eos) for j in jobs]
    width = max(len(j.prompt_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(jobs), width), dtype=torch.int64)
    for i, j in enumerate(jobs):  # left padding: every row's last token is at -1
        ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
        mask[i, width - len(j.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    for i, row in enumerate(rows):
        n = len(row.prompt)
        row.prefilled = n
        if row.scores_prompt and n > 1:  # position p's logits score prompt token p+1
            try:  # a row that fails ends alone, never its neighbours
                score = ScoreRows(0, row.prompt[1:], row.prompt_logprobs_k)
                block = out.logits[i, width - n : width - 1].float()
                _, scored = sample_on_host(SamplingBatch([], [score], vocab), block)
                row.add_prompt_logprobs(scored[0])
            except Exception:
                log.exception("request %s failed while scoring its prompt", row.job.request_id)
                row.job.finish_reason = "error"
                row.job.emit("error", INTERNAL)
                continue
        row.prompt_done()
    for _ in range(max(j.params.max_tokens for j in jobs)):
        if all(r.done for r in rows):
            break
        logits = out.logits[:, -1, :].float()
        step = torch.full((len(jobs), 1), pad, dtype=torch.int64)
        for row in rows:
            if not row.done and row.job.cancelled.is_set():
                row.finish("cancelled")
        live = [(i, row) for i, row in enumerate(rows) if not row.done]
        picks = sample_rows(logits, [Row(i, row.sampling, row.ids) for i, row in live], vocab)
        for (i, row), pick in zip(live, picks, strict=True):
            try:  # a row that fails ends alone, never its neighbours
                if isinstance(pick, Exception):
                    raise pick
                row.add(*pick)
            except Exception:
                log.exception("request %s failed while sampling", row.job.request_id)
                row.job.finish_reason = "error"
                row.job.emit("error", INTERNAL)
                continue
            step[i, 0] = row.last_token
        if all(r.done for r in rows):
            break
        mask = torch.cat([mask, torch.ones((len(jobs), 1), dtype=mask.dtype, device=device)], 1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=step.to(device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
        )
