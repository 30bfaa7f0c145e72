"""The soak's CLI: `python -m benchmarks.soak --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import benchmarks.soak
from benchmarks.soak.disconnects import DISCONNECT_RSS_BOUND, run_disconnects
from benchmarks.soak.fixtures import ADMIN_TOKEN, build_variants, fill_store, soak_settings
from benchmarks.soak.probes import MiB
from benchmarks.soak.run import SOAK_RSS_BOUND, run_soak

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=benchmarks.soak.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--duration", type=float, default=600, help="soak seconds (0: no soak)")
    ap.add_argument("--concurrency", type=int, default=8, help="steady closed-loop clients")
    ap.add_argument("--variants", type=int, default=8, help="stable variants (besides the base)")
    ap.add_argument(
        "--churn-variants",
        type=int,
        default=2,
        help="variants deleted and re-uploaded, and as many extra ones uploaded and deleted",
    )
    ap.add_argument("--queue-limit", type=int, default=8, help="the server's queue_limit")
    ap.add_argument("--max-batch-size", type=int, default=4, help="the server's running slots")
    ap.add_argument("--burst-size", type=int, default=32, help="requests sent at once per burst")
    ap.add_argument("--burst-every", type=float, default=5.0, help="seconds between bursts")
    ap.add_argument("--admin-pause", type=float, default=0.2, help="longest pause between ops")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline")
    ap.add_argument("--rss-bound-mib", type=float, default=SOAK_RSS_BOUND / MiB)
    ap.add_argument("--disconnects", type=int, default=0, help="clients that hang up (0: none)")
    ap.add_argument("--disconnect-concurrency", type=int, default=16)
    ap.add_argument("--disconnect-rss-bound-mib", type=float, default=DISCONNECT_RSS_BOUND / MiB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: temp)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)

    import platform
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from deltastore.testing import make_model, save
    from server.app import ThreadedServer

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="deltaserve-soak-"))
    base_dir = save(make_model(0), work / "base")
    variants = build_variants(
        base_dir, work / "variants", args.variants, args.churn_variants, args.churn_variants
    )
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    fill_store(store, variants)
    settings = soak_settings(
        base_dir, store, queue_limit=args.queue_limit, max_batch_size=args.max_batch_size
    )
    out: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "server": settings.model_dump(mode="json", exclude={"admin_token"}),
        "models": [v.name for v in variants],
    }
    failed = False
    try:
        if args.duration > 0:
            srv = ThreadedServer(settings)
            try:
                srv.wait_ready()
                soak = run_soak(
                    srv.url,
                    ADMIN_TOKEN,
                    variants,
                    args.duration,
                    args.concurrency,
                    burst_size=args.burst_size,
                    burst_every_s=args.burst_every,
                    admin_pause_s=args.admin_pause,
                    warmup_s=args.warmup,
                    rss_bound_bytes=int(args.rss_bound_mib * MiB),
                    state=srv.state,
                    seed=args.seed,
                )
            finally:
                srv.stop()
            out["soak"] = soak.to_dict()
            print(soak.summary())
            failed |= bool(soak.problems())
        if args.disconnects > 0:
            # a server of its own, its queue (64) deeper than the clients at once
            dsettings = soak_settings(
                base_dir, store, max_batch_size=args.max_batch_size, queue_limit=64
            )
            out["disconnect_server"] = dsettings.model_dump(mode="json", exclude={"admin_token"})
            srv = ThreadedServer(dsettings)
            try:
                srv.wait_ready()
                disc = run_disconnects(
                    srv.url,
                    [v.name for v in variants if not v.churn],
                    args.disconnects,
                    args.disconnect_concurrency,
                    rss_bound_bytes=int(args.disconnect_rss_bound_mib * MiB),
                    state=srv.state,
                )
            finally:
                srv.stop()
            out["disconnects"] = disc.to_dict()
            print(disc.summary())
            failed |= bool(disc.problems())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
