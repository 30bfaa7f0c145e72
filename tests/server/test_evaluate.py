"""`deltaserve eval` against a live server: multiple-choice rows are scored by the
model's loglikelihood (as transformers computes it), generation rows as the same
weights score in-process."""

from __future__ import annotations

import json

import torch

from deltastore.sources import open_model
from server.cli import main
from tests.server.conftest import PROMPTS, reference_text


def _best(model_dir, tok, context: str, choices: list[str]) -> int:
    model = open_model(model_dir).load_model().eval()
    ctx = tok(context)["input_ids"]
    scores = []
    for c in choices:
        ids = tok(context + c)["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = max(min(len(ctx), len(ids) - 1), 1)
        scores.append(sum(float(lp[j - 1, ids[j]]) for j in range(start, len(ids))))
    return max(range(len(choices)), key=scores.__getitem__)


def test_eval_scores_choices_and_generations(live, materialized, tmp_path, capsys):
    tok = live.state.engine.tokenizer
    choices = [" cat", " mat", " ran", " the"]
    rows = []
    for i, context in enumerate(PROMPTS[:4]):
        best = _best(materialized["v0"], tok, context, choices)
        label = best if i % 2 == 0 else (best + 1) % 4  # two right, two wrong for v0
        rows.append({"context": context, "choices": choices, "label": label})
    rows += [{"prompt": p, "answer": "cat"} for p in PROMPTS]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "scores.json"
    code = main(
        [
            "eval",
            "v0",
            "--task",
            str(task),
            "--url",
            live.url,
            "--no-chat",
            "--finetune",
            str(materialized["v0"]),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    scores = json.loads(out.read_text())["scores"]
    base = live.state.base_name
    assert list(scores)[:2] == [base, "v0"]  # the base first, for the gain
    # v0: 2 of 4 choices right; generations; the in-process score of its weights agrees
    local = next(v for k, v in scores.items() if k.endswith("(in-process)"))
    assert scores["v0"] == local
    # generations: greedy, the answer's 3 tokens + 2, an exact match of the stripped text
    hits = sum(reference_text(materialized["v0"], p, 5).strip() == "cat" for p in PROMPTS)
    assert scores["v0"] == (2 + hits) / 9
    assert "accuracy" in capsys.readouterr().out


def test_eval_refuses_bad_input_clearly(live, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    assert main(["eval", "v0", "--task", str(task), "--url", live.url]) == 2
    assert "label 3" in capsys.readouterr().err
    task.write_text('{"prompt": "a", "answer": "b"}\n')
    assert main(["eval", "nope", "--task", str(task), "--url", live.url]) == 2
    assert "not served: nope" in capsys.readouterr().err
