"""Soak test: greedy completions of many variants under admin churn and overload, every
answer checked against transformers, process memory watched; and 1,000 clients that
hang up mid-stream, after which nothing may be left behind in the server.

    python -m benchmarks.soak                          # 600 s soak on a tiny model
    python -m benchmarks.soak --duration 60 --disconnects 1000
    python -m benchmarks.soak --duration 0 --disconnects 1000   # the disconnects alone

The CLI builds everything itself (nothing is downloaded): a tiny Llama base (the test
suite's model, `deltastore/testing.py`), --variants stable fine-tunes and --churn-variants
churned ones (large perturbations compressed with DAREx-q, p = 0.5, as the test
suite's `variant_files`), and the reference text of every (variant, prompt, length)
from the fine-tune materialized and run in plain transformers (never the server). It
serves them with engine v2 from a `ThreadedServer` in this process on 127.0.0.1 (fp32
on the CPU, a small --queue-limit so that bursts overflow it), runs the soak for
--duration seconds and writes a JSON report (--out).

The soak (`run_soak`), until its time is up:
- --concurrency closed-loop clients send greedy completions (half of them streaming)
  of a few prompts to the base and every variant; each 200 must equal that variant's
  reference exactly;
- an admin thread churns: preload, evict, pin, unpin, replace with the same bytes (the
  stable variants and the churned ones), delete-then-reupload of the same bytes and
  upload/delete of extra variants (the churned ones only). Clients query the churned
  variants too: a 404 (`model_not_found`) is expected for one only while the churner
  has it deleted, tracked per request; a stable variant must always answer 200;
- every --burst-every seconds, --burst-size requests at once (longer generations) more
  than the queue and the running slots hold: some must be refused with 429 and the
  OpenAI error body {"error": {"message", "type", "code"}};
- the process RSS (VmRSS) is sampled: its growth from the end of --warmup to the end
  must stay under --rss-bound-mib.

The disconnects (`run_disconnects`): N streaming completions (16 at a time) that read
the first content chunk and close the connection. Afterwards the server must go idle:
no queued or running request, no KV slot used, nothing in flight for any variant, no
delta layout held but the merged variant's; and the RSS growth from after the first
100 to the end stays under a bound.

Memory bounds, from measurements (tiny model, 2 CPU cores, the RSS of the whole
process: server, clients and torch). Soak: after the warm-up, +1.5 MiB in a 150 s
soak (11,200 requests, 1,100 admin operations) and +5.1 MiB in a 600 s one (37,700
requests, 4,200 admin operations; benchmarks/results/soak.json). Before the store
read delta files through numpy, safetensors' framework="pt" reader kept ~2.2 KiB
per read of these deltas and a 300 s soak grew +8.5 MiB (about 2 MiB a minute).
Disconnects: +1.2 to +3.2 MiB from after the first 100 to 1,000; 8,000 in a row grew
7.4 MiB over the first 1,000 and then under 0.3 MiB per 1,000. The bounds, 64 MiB
for the soak and 32 MiB for the disconnects, hold that with room, while a leak of
5 KiB per request (60 MiB over the 150 s soak's 12,000) or of 36 KiB per dropped
stream would cross them; leaked slots and in-flight requests are checked directly.
"""

from benchmarks.soak.disconnects import DISCONNECT_RSS_BOUND, DisconnectReport, run_disconnects
from benchmarks.soak.fixtures import (
    ADMIN_TOKEN,
    BURST_MAX_TOKENS,
    BURST_PROMPT,
    DISCONNECT_MAX_TOKENS,
    DISCONNECT_PROMPT,
    MAX_TOKENS,
    PROMPTS,
    Variant,
    build_variants,
    fill_store,
    soak_settings,
)
from benchmarks.soak.probes import (
    EXAMPLES,
    MiB,
    capture_errors,
    counter_total,
    is_error_body,
    is_idle,
    rss_bytes,
    server_leftovers,
    wait_idle,
)
from benchmarks.soak.run import SOAK_RSS_BOUND, SoakReport, run_soak

__all__ = [
    "ADMIN_TOKEN",
    "BURST_MAX_TOKENS",
    "BURST_PROMPT",
    "DISCONNECT_MAX_TOKENS",
    "DISCONNECT_PROMPT",
    "DISCONNECT_RSS_BOUND",
    "EXAMPLES",
    "MAX_TOKENS",
    "PROMPTS",
    "SOAK_RSS_BOUND",
    "DisconnectReport",
    "MiB",
    "SoakReport",
    "Variant",
    "build_variants",
    "capture_errors",
    "counter_total",
    "fill_store",
    "is_error_body",
    "is_idle",
    "rss_bytes",
    "run_disconnects",
    "run_soak",
    "server_leftovers",
    "soak_settings",
    "wait_idle",
]
