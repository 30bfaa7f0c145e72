"""The baselines deltaserve is compared with, behind the same OpenAI-style routes so
the same `deltaserve loadtest` drives them (benchmarks/serving.py starts them):

- reload: one model in memory; a request for another variant loads that variant's
  full checkpoint from disk with `from_pretrained` (what people do with plain
  transformers);
- dense:  every variant held dense in memory, up to --keep of them (LRU beyond);
- peft:   the base with every LoRA adapter loaded (PEFT), `set_adapter` per request.

Requests are served one at a time, greedy, with all torch work on the event-loop
thread (one thread, as deltaserve's worker).

    python -m benchmarks.naive_server --mode reload --models-dir DIR --port 8940
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from transformers import AutoModelForCausalLM, AutoTokenizer


class Models:
    def __init__(self, mode: str, models_dir: Path, base: Path | None, keep: int) -> None:
        self.mode, self.dir, self.keep = mode, models_dir, keep
        self.names = sorted(p.name for p in models_dir.iterdir() if p.is_dir())
        self.loaded: OrderedDict[str, Any] = OrderedDict()
        self.loads = 0
        tok_dir = base if base is not None else models_dir / self.names[0]
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.peft: Any = None
        if mode == "peft":
            from peft import PeftModel

            assert base is not None
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            self.peft = PeftModel.from_pretrained(model, models_dir / self.names[0], self.names[0])
            for name in self.names[1:]:
                self.peft.load_adapter(models_dir / name, adapter_name=name)
            self.peft.eval()

    def get(self, name: str) -> Any:
        if self.peft is not None:
            self.peft.set_adapter(name)
            return self.peft
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        while len(self.loaded) >= self.keep:
            self.loaded.popitem(last=False)
        model = AutoModelForCausalLM.from_pretrained(self.dir / name, dtype=torch.float32).eval()
        self.loads += 1
        self.loaded[name] = model
        return model


def create_app(models: Models) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in models.names]}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
        name = body.get("model")
        if name not in models.names:
            return JSONResponse({"error": {"message": f"no model {name!r}"}}, status_code=404)
        # blocking on purpose: one request at a time, torch on this one thread
        model = models.get(name)
        tok = models.tokenizer
        ids = tok(body["prompt"], return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(body["max_tokens"]),
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        n = int((new != tok.eos_token_id).sum())
        return {
            "id": f"cmpl-{time.time_ns()}",
            "object": "text_completion",
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "text": tok.decode(new, skip_special_tokens=True),
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": ids.shape[1],
                "completion_tokens": n,
                "total_tokens": ids.shape[1] + n,
            },
        }

    return app


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=["reload", "dense", "peft"], required=True)
    ap.add_argument(
        "--models-dir", type=Path, required=True, help="one model (or adapter) dir per variant"
    )
    ap.add_argument("--base", type=Path, help="base model dir (peft mode)")
    ap.add_argument("--keep", type=int, default=1, help="models held in memory (dense mode)")
    ap.add_argument("--port", type=int, default=8940)
    args = ap.parse_args()
    keep = 1 if args.mode == "reload" else args.keep
    app = create_app(Models(args.mode, args.models_dir, args.base, keep))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
