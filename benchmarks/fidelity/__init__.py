"""Fidelity: how much of a fine-tune survives each pruning method and rate.

    python -m benchmarks.fidelity [--finetunes arith-adamw,...] [--rates 0.99,0.999]
                                  [--methods dare,darex-q/unlabelled,...] [--report]

Fine-tunes the embedded base (SmolLM2-135M-Instruct) on three generated tasks with
fixed splits (deltastore/tasks.py: arith, extract, topic), with AdamW and with AdamR
(DAREx-L2), plus one LoRA (PEFT); compresses each with `deltastore.compress` (the
code behind `deltaserve compress`) at every rate and method; and scores every delta
by exact match on the task's test split, applied to the resident base through the
engine's apply path (`deltastore.apply`, what the server runs), then reverted.

Everything is cached under --work (default ~/.cache/deltaserve/bench/fidelity):
fine-tunes, and one result per (fine-tune, method, rate) in --out, so an interrupted
run resumes where it stopped. --report only prints the tables and draws the plot from --out.

The package: catalog.py (fine-tunes, rates, methods, cached task files), run.py
(compress and score), report.py (tables), plots.py; __main__.py the command.
"""
