"""Dense-tensor policy: prune the embedding (tied with lm_head) or store it dense?

    python -m benchmarks.policy [--rate 0.99] [--n-test 64]

Compresses the benchmark fine-tune of the embedded base (see benchmarks/swap.py)
at --rate with darex-q (unlabelled q search) under two policies and scores each
variant, applied through the engine's own apply path, on held-out examples:
- vectors-dense (the default): norms and biases dense, every matrix pruned;
- + embeddings dense: the embedding matrix stored dense too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deltastore.apply import FlatWeights, apply_delta_, bind, revert_delta_
from deltastore.calib import Example, exact_match
from deltastore.compress import CompressOptions, compress
from deltastore.embedded import ensure_embedded_base
from deltastore.finetune import FinetuneConfig, finetune, format_prompt
from deltastore.format import load_delta, save_delta
from deltastore.methods import Method
from deltastore.paths import cache_dir
from deltastore.qsearch import QSearch
from deltastore.sources import fingerprint, open_finetune, open_model
from deltastore.tasks import arithmetic


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=0.99)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/policy.json"))
    args = ap.parse_args()

    base_dir = ensure_embedded_base()
    work = cache_dir() / "bench"
    ft_dir = finetune(
        base_dir, arithmetic(512), work / "finetunes" / "arith-adamw", FinetuneConfig()
    )
    base = open_model(base_dir)
    ft = open_finetune(base, ft_dir)
    tok = base.load_tokenizer()
    test = [
        Example(format_prompt(tok, e.prompt, chat=True), e.answer)
        for e in arithmetic(args.n_test, seed=12345)
    ]
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"{e.prompt} {e.answer}" for e in arithmetic(200, seed=7)))

    model = base.load_model(torch.float32)
    weights = FlatWeights.from_module(model, fingerprint=fingerprint(base))
    rows = [{"variant": "base", "accuracy": exact_match(model, tok, test), "file_bytes": None}]
    undo = apply_delta_(weights, bind(list(_full_delta(ft)), weights))
    rows.append({"variant": "fine-tune (dense)", "accuracy": exact_match(model, tok, test)})
    revert_delta_(weights, undo)

    policies = {"vectors-dense (default)": (), "+ embeddings dense": (r"embed_tokens",)}
    for label, dense in policies.items():
        opts = CompressOptions(
            method=Method.DAREX_Q,
            rate=args.rate,
            q_search=QSearch.UNLABELLED,
            calib=calib,
            dense_patterns=dense,
        )
        path = work / f"policy-{len(dense)}-{args.rate}.delta.safetensors"
        save_delta(path, compress(base, ft, opts))
        delta = load_delta(path)
        undo = apply_delta_(weights, bind(delta, weights))
        acc = exact_match(model, tok, test)
        revert_delta_(weights, undo)
        rows.append(
            {
                "variant": label,
                "accuracy": acc,
                "file_bytes": path.stat().st_size,
                "q": delta.meta.q,
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\n| variant (p={args.rate}) | exact match ({args.n_test} held out) | file |")
    print("|---|---|---|")
    for r in rows:
        size = f"{r['file_bytes'] / 1e6:.2f} MB" if r.get("file_bytes") else "-"
        print(f"| {r['variant']} | {r['accuracy']:.3f} | {size} |")


def _full_delta(ft):  # type: ignore[no-untyped-def]
    from deltastore.format import TensorDelta

    for name, d in ft.deltas():
        yield TensorDelta.from_dense(name, d)


if __name__ == "__main__":
    main()
