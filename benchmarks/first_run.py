"""First run: the README's serve command on an empty cache, timed until both demo
variants answer, then the demos' accuracy on their held-out test splits.

    python -m benchmarks.first_run [--keep-base] [--test-rows 200]

`deltaserve serve` is started as a user starts it (a subprocess on 127.0.0.1, in a
fresh working directory, `DELTASERVE_CACHE` pointing at an empty directory), so the
timeline includes fetching and converting the embedded base (`--keep-base` copies
the already converted base into the fresh cache, to time the rest alone). Times are
from process start:
- `health`: the port answers /health;
- `base_ready`: /ready is 200 (the base serves);
- `demo:NAME`: the variant is in /v1/models;
- `both_answering`: a chat completion to each demo has returned 200.
Then every row of each demo's test split (`deltastore.tasks.splits`, never trained
on nor used for the q search) is sent at temperature 0 through the chat endpoint
(the README's usage), and the exact-match accuracy is recorded; for json-extract
also on the held-out phrasings (`extract-phrasings`: sentence shapes no training
row has).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from deltastore.demo import DEMOS
from deltastore.embedded import embedded_base_dir
from deltastore.tasks import splits

PORT = 8937
RESULTS = Path(__file__).parent / "results" / "first_run.json"
HELD_OUT = {"json-extract": "extract-phrasings"}  # other phrasings than training's


def _wait(what: str, check, start: float, timeout: float, proc: subprocess.Popen) -> float:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before {what}")
        try:
            if check():
                return round(time.perf_counter() - start, 1)
        except httpx.HTTPError:
            pass
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{what}: not reached in {timeout} s")
        time.sleep(0.1)


def _chat(client: httpx.Client, model: str, prompt: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 48,
    }
    return client.post("/v1/chat/completions", json=body)


def run(keep_base: bool, test_rows: int, timeout: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="deltaserve-first-run-"))
    cache, work = root / "cache", root / "work"
    work.mkdir()
    if keep_base:
        shutil.copytree(embedded_base_dir(), cache / "models" / embedded_base_dir().name)
    env = {**os.environ, "DELTASERVE_CACHE": str(cache), "DELTASERVE_PORT": str(PORT)}
    exe = Path(sys.executable).with_name("deltaserve")
    log = (root / "serve.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "serve"], cwd=work, env=env, stdout=log, stderr=log)
    out: dict = {"keep_base": keep_base, "times_s": {}, "load_average_at_start": os.getloadavg()}
    t = out["times_s"]
    try:
        # a long read timeout: on a loaded machine one answer can take tens of seconds
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=600) as client:
            t["health"] = _wait(
                "/health", lambda: client.get("/health").status_code == 200, start, 60, proc
            )
            t["base_ready"] = _wait(
                "/ready", lambda: client.get("/ready").status_code == 200, start, timeout, proc
            )
            for demo in DEMOS:

                def listed(name: str = demo.name) -> bool:
                    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
                    return name in ids

                t[f"demo:{demo.name}"] = _wait(demo.name, listed, start, timeout, proc)
            for demo in DEMOS:
                prompt = splits(demo.task, n_test=test_rows)[2][0].prompt
                assert _chat(client, demo.name, prompt).status_code == 200
            t["both_answering"] = round(time.perf_counter() - start, 1)
            out["accuracy"] = {}
            sets = [(d.name, d.task, d.name) for d in DEMOS]
            sets += [(name, task, f"{name} ({task})") for name, task in HELD_OUT.items()]
            for name, task, label in sets:
                rows = splits(task, n_test=test_rows)[2]
                right, wrong = 0, []
                for row in tqdm(rows, desc=f"test split of {label}", unit="row"):
                    r = _chat(client, name, row.prompt)
                    r.raise_for_status()
                    text = r.json()["choices"][0]["message"]["content"].strip()
                    if text == row.answer:
                        right += 1
                    elif len(wrong) < 5:
                        wrong.append({"prompt": row.prompt, "want": row.answer, "got": text})
                out["accuracy"][label] = {
                    "rows": len(rows),
                    "exact_match": round(right / len(rows), 3),
                    "wrong_examples": wrong,
                }
    except Exception as e:  # the timeline so far is still worth keeping
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["load_average_at_end"] = os.getloadavg()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        lines = (root / "serve.log").read_text().replace("\r", "\n").splitlines()
        out["log"] = [s for s in lines if any(f" {x} " in s for x in ("INFO", "WARNING", "ERROR"))]
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-base", action="store_true", help="start with the base converted")
    ap.add_argument("--test-rows", type=int, default=200, help="test rows scored per demo")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per stage")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    result = run(args.keep_base, args.test_rows, args.timeout)
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    runs.append(result)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
