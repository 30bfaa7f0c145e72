"""Structured output: what a grammar's token mask costs, per library and in serving.

    python -m benchmarks.structured                          # both parts
    python -m benchmarks.structured --part mask --rows 1 8   # the libraries only
    python -m benchmarks.structured --part serve --max-tokens 32

Part `mask`: each grammar library that is installed (llguidance, xgrammar,
outlines-core) on the embedded base's tokenizer (SmolLM2, 49,152 tokens), with JSON in
one line (json.dumps's separators, as deltaserve generates it): the time to read the
tokenizer, to compile the extraction schema, and per generated token the time to fill
the mask of `--rows` matchers (what a step with that many constrained rows waits for
on the host) and to advance them, replaying the tokens of a valid answer. Also the
mask's application to the logits (sampling.py's `_allow`: the same int32 bitmask for
every library).

Part `serve`: the engine in process (no HTTP) on the embedded base and the shipped
json-extract demo, --rows requests of extraction prompts: none, half or all of them
held to the schema (the others free), the same prompts and greedy sampling. Reported:
generated tokens/s and the median step time (a held answer ends when its JSON does, so
token counts differ a little; the step time compares like with like).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deltastore.embedded import ensure_embedded_base
from deltastore.tasks import EXTRACT_PROMPT
from server.engine.sampling import _allow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ANSWER = {"name": "Mateo", "age": 45, "city": "Buenos Aires"}
SENTENCES = [
    "Mateo lives in Buenos Aires. He is 45.",
    "Nora is a 41-year-old pilot who lives in Oslo.",
    "Living in Lima, Ana works as a baker and is 33 years old.",
    "At 58, Kenji the judge moved to Kyoto.",
    "Meet Sara: 27 years old and based in Cape Town.",
    "In Hong Kong, Wei works as a nurse; he turned 39 last month.",
    "The chemist from Tel Aviv, Dana, is 50.",
    "Omar moved to Mexico City years ago and is 61 now.",
]


def _ms(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.median(a)), "p99": float(np.quantile(a, 0.99))}


# --------------------------------------------------------------------------- part mask


class Library:
    """One grammar library driven the way a server drives it."""

    name = ""

    def setup(self, tok: Any, vocab: int, eos: set[int]) -> None: ...
    def compile(self, schema: str) -> Any: ...
    def matchers(self, grammar: Any, n: int) -> list[Any]: ...
    def fill(self, matchers: list[Any]) -> None: ...
    def advance(self, matchers: list[Any], token: int) -> None: ...


class LLGuidance(Library):
    name = "llguidance"

    def setup(self, tok: Any, vocab: int, eos: set[int]) -> None:
        from server.engine.grammar import GrammarKind, Grammars, fill_bitmask

        self.table, self.kind, self._fill = Grammars(tok, vocab, eos), GrammarKind, fill_bitmask

    def compile(self, schema: str) -> Any:
        return self.table.get(self.kind.JSON_SCHEMA, schema)

    def matchers(self, grammar: Any, n: int) -> list[Any]:
        return [grammar.matcher() for _ in range(n)]

    def fill(self, matchers: list[Any]) -> None:
        self._fill(matchers)

    def advance(self, matchers: list[Any], token: int) -> None:
        for m in matchers:
            m.advance(token)


class XGrammar(Library):
    name = "xgrammar"

    def setup(self, tok: Any, vocab: int, eos: set[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            tok, vocab_size=vocab, stop_token_ids=sorted(eos)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(", ", ": ")
        )

    def matchers(self, grammar: Any, n: int) -> list[Any]:
        self.bitmask = self.xgr.allocate_token_bitmask(n, self.info.vocab_size)
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    def fill(self, matchers: list[Any]) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(self.bitmask, i)

    def advance(self, matchers: list[Any], token: int) -> None:
        for m in matchers:
            assert m.accept_token(token)


class OutlinesCore(Library):
    name = "outlines-core"

    def setup(self, tok: Any, vocab: int, eos: set[int]) -> None:
        import outlines_core as oc

        from server.state import _BYTE_DECODER

        self.oc = oc
        pieces: dict[bytes, list[int]] = {}
        for piece, i in tok.get_vocab().items():
            if i in eos or not all(c in _BYTE_DECODER for c in piece):
                continue
            pieces.setdefault(bytes(_BYTE_DECODER[c] for c in piece), []).append(i)
        self.vocab = oc.Vocabulary(min(eos), pieces)
        self.words = (vocab + 31) // 32

    def compile(self, schema: str) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(schema, r"( )?")
        return self.oc.Index(regex, self.vocab)

    def matchers(self, grammar: Any, n: int) -> list[Any]:
        self.bitmask = torch.zeros((n, self.words), dtype=torch.int32)
        return [self.oc.Guide(grammar) for _ in range(n)]

    def fill(self, matchers: list[Any]) -> None:
        for i, g in enumerate(matchers):
            row = self.bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, matchers: list[Any], token: int) -> None:
        for g in matchers:
            g.advance(token)


LIBRARIES: dict[str, Callable[[], Library]] = {
    "llguidance": LLGuidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}


def mask_part(base_dir: Path, names: list[str], rows: list[int], repeats: int) -> list[dict]:
    from transformers import AutoTokenizer

    from server.engine.grammar import mask_words

    tok = AutoTokenizer.from_pretrained(base_dir)
    vocab = len(tok)
    eos = {int(tok.eos_token_id)}
    answer = json.dumps(ANSWER)  # json.dumps's separators: what the grammars generate
    tokens = tok(answer, add_special_tokens=False)["input_ids"]
    schema = json.dumps(SCHEMA)
    out = []
    for name in names:
        lib = LIBRARIES[name]()
        try:
            t0 = time.perf_counter()
            lib.setup(tok, vocab, eos)
            setup_s = time.perf_counter() - t0
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        t0 = time.perf_counter()
        grammar = lib.compile(schema)
        compile_s = time.perf_counter() - t0
        for n in rows:
            fill, advance = [], []
            for _ in tqdm(range(repeats), desc=f"{name} x{n}", leave=False):
                ms = lib.matchers(grammar, n)
                for t in tokens:
                    t0 = time.perf_counter()
                    lib.fill(ms)
                    t1 = time.perf_counter()
                    lib.advance(ms, t)
                    fill.append(t1 - t0)
                    advance.append(time.perf_counter() - t1)
            r = {
                "library": name,
                "rows": n,
                "tokenizer_s": setup_s,
                "compile_ms": compile_s * 1e3,
                "fill_ms": _ms(fill),
                "advance_ms": _ms(advance),
                "tokens": len(tokens),
            }
            out.append(r)
            print(json.dumps(r))
    for n in rows:  # the mask on the logits: the same for every library
        logits = torch.randn(n, vocab)
        words = torch.from_numpy(
            np.random.default_rng(0).integers(-(2**31), 2**31, (n, mask_words(vocab)), np.int32)
        ).view(torch.int64)
        idx = torch.arange(n)
        _allow(logits, idx, words)  # warm-up
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            _allow(logits, idx, words)
            times.append(time.perf_counter() - t0)
        r = {"apply": "sampling._allow", "rows": n, "ms": _ms(times)}
        out.append(r)
        print(json.dumps(r))
    return out


# --------------------------------------------------------------------------- part serve


def serve_part(base_dir: Path, rows: int, max_tokens: int, repeats: int) -> list[dict]:
    from deltastore.demo import install_demos
    from deltastore.sources import open_model
    from deltastore.store import DeltaStore
    from server.config import Settings
    from server.engine.core import Engine
    from server.engine.grammar import GrammarKind, Grammars
    from server.engine.job import Job, SamplingParams
    from server.engine.llm_engine import LLMEngine
    from server.engine.sequence import end_token_ids
    from server.metrics import Metrics

    out: list[dict] = []
    with TemporaryDirectory() as tmp:
        store = DeltaStore(Path(tmp))
        install_demos(base_dir, store, progress=False)
        settings = Settings(
            base=base_dir,
            store=Path(tmp),
            device="cpu",
            dtype="bfloat16",
            max_batch_size=rows,
            demo=False,
            max_new_tokens=max(max_tokens, 64),
        )
        engine = Engine(open_model(base_dir), store, settings)
        tok = engine.tokenizer
        table = Grammars(tok, int(engine.model.config.vocab_size), end_token_ids(engine.model, tok))
        grammar = table.get(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
        prompts = []
        for i in range(rows):
            turn = [{"role": "user", "content": EXTRACT_PROMPT + SENTENCES[i % len(SENTENCES)]}]
            text = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            prompts.append(tok(text, add_special_tokens=False)["input_ids"])
        configs = sorted({0, rows // 2, rows})
        # a first run lays the variant out (the loader), unmeasured
        for warm, held in enumerate(tqdm([configs[0], *configs], desc="held rows")):
            runs = []
            for _ in range(repeats):
                sched = LLMEngine(engine, settings, Metrics())
                jobs = []
                t0 = time.perf_counter()
                for k, ids in enumerate(prompts):
                    g = grammar if k < held else None
                    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, grammar=g)
                    job = Job("json-extract", ids, params, lambda kind, payload: None)
                    jobs.append(job)
                    sched.submit(job)
                steps = []  # of the steps that ran rows (not those waiting for the loader)
                made = 0
                while any(j.finish_reason is None for j in jobs):  # on this thread (mixed.py)
                    t = time.perf_counter()
                    sched._step()
                    took = time.perf_counter() - t
                    now = sum(j.completion_tokens for j in jobs)
                    if now > made:
                        steps.append(took)
                    made = now
                wall = time.perf_counter() - t0
                engine.activate(None)
                valid = sum(_valid(j.text) for j in jobs[:held])
                n = sum(j.completion_tokens for j in jobs)
                runs.append(
                    {
                        "tokens_per_s": n / wall,
                        "step_ms_p50": statistics.median(steps) * 1e3,
                        "tokens": n,
                        "held_valid": f"{valid}/{held}",
                    }
                )
            r = {"rows": rows, "held": held, **min(runs, key=lambda x: x["step_ms_p50"])}
            r["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in runs)
            if warm == 0:
                continue
            out.append(r)
            print(json.dumps(r))
    return out


def _valid(text: str) -> bool:
    try:
        got = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(got, dict) and set(got) == set(SCHEMA["properties"])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=["mask", "serve", "both"], default="both")
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="mask: matchers per step")
    ap.add_argument("--serve-rows", type=int, default=8, help="serve: requests at once")
    ap.add_argument("--max-tokens", type=int, default=32, help="serve: tokens per request")
    ap.add_argument("--repeats", type=int, default=20, help="mask: replays of the answer")
    ap.add_argument("--serve-repeats", type=int, default=1, help="serve: runs per setting")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/structured.json"))
    args = ap.parse_args()
    # as benchmarks/mixed.py: without it, small ops ran ~1000x slower here (OpenMP's pool)
    torch.set_num_threads(torch.get_num_threads())
    base_dir = ensure_embedded_base()
    result: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.part in ("mask", "both"):
        result["mask"] = mask_part(base_dir, args.libraries, args.rows, args.repeats)
    if args.part in ("serve", "both"):
        result["serve"] = serve_part(base_dir, args.serve_rows, args.max_tokens, args.serve_repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
