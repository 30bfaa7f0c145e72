"""The deployment files, checked without a Docker engine (none runs on these
machines): hadolint on the Dockerfile, the compose/Prometheus/Grafana files against
what the server really exports, the HEALTHCHECK command against a live server, and
the entrypoint script run outside a container."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.metrics import Metrics
from tests.server.conftest import LiveServer, make_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)  # non-root, numeric
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'VOLUME ["/data/deltas", "/data/cache"]' in text
    assert "ARG TORCH=cpu" in text and "ARG FETCH_BASE=0" in text
    assert "ADMIN_TOKEN" not in text.split("# No secrets")[1].split("\n", 1)[1]  # no token baked


def test_compose_and_prometheus():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"deltaserve", "prometheus", "grafana"}
    ds = svc["deltaserve"]
    assert ds["environment"]["DELTASERVE_ADMIN_TOKEN"].startswith("${DELTASERVE_ADMIN_TOKEN:?")
    assert {"deltas:/data/deltas", "cache:/data/cache"} <= set(ds["volumes"])
    assert all(p.startswith("127.0.0.1:") for s in svc.values() for p in s.get("ports", []))
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["deltaserve:8000"]


class _FakeTier:
    def __init__(self, tier):
        self.tier, self.hits, self.misses, self.evictions, self.used, self.budget = (
            tier,
            0,
            0,
            0,
            0,
            1,
        )

    def list(self):
        return []


class _FakeEngine:
    tiers = (_FakeTier("materialized"), _FakeTier("device"), _FakeTier("host"))
    materialized = tiers[0]


def test_dashboard_queries_only_metrics_the_server_exports():
    m = Metrics()
    m.watch_engine(lambda: _FakeEngine())
    m.requests.labels("/v1/completions", "200").inc()
    m.swap_seconds.labels("inplace").observe(0.01)
    m.steps.labels("merged").inc()
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in m.render().decode().splitlines()
        if line and not line.startswith("#")
    }
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "deltaserve.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):  # a row has none
            used |= set(re.findall(r"deltaserve_[a-z_]+", target["expr"]))
    assert used, "the dashboard queries nothing"
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for key in ("latency", "throughput", "swaps", "cache"):
        assert key in titles


def _healthcheck_code() -> str:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    line = next(x for x in lines if 'CMD ["python"' in x)
    return json.loads(line.split("CMD", 1)[1].strip())[2]


def test_healthcheck_command_against_a_live_server(tiny_dirs, tmp_path):
    code = _healthcheck_code()
    srv = LiveServer(make_settings(tiny_dirs["base"], tmp_path / "s"))
    try:
        port = srv.url.rsplit(":", 1)[1]
        ok = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "DELTASERVE_PORT": port}
        )
        assert ok.returncode == 0
    finally:
        srv.stop()
    down = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "DELTASERVE_PORT": "9"},
        capture_output=True,
    )
    assert down.returncode != 0


# ------------------------------------------------------------------ entrypoint


@pytest.fixture
def fake_path(tmp_path):
    """A stand-in `deltaserve` on PATH that prints what it was started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deltaserve"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "ARGS:$*"\necho "STORE:$DELTASERVE_STORE"\necho "CACHE:$DELTASERVE_CACHE"\n'
    )
    fake.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _entry(args, path, **env):
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args], env=full, capture_output=True, text=True
    )


def test_entrypoint_serve_creates_dirs_and_execs(fake_path, tmp_path):
    store, cache = tmp_path / "deltas", tmp_path / "cache"
    res = _entry(
        ["serve", "--port", "9000"],
        fake_path,
        DELTASERVE_STORE=str(store),
        DELTASERVE_CACHE=str(cache),
        DELTASERVE_ADMIN_TOKEN="long-enough-token",
    )
    assert res.returncode == 0, res.stderr
    assert "ARGS:serve --port 9000" in res.stdout and f"STORE:{store}" in res.stdout
    assert store.is_dir() and cache.is_dir() and res.stderr == ""


def test_entrypoint_default_and_warnings(fake_path, tmp_path):
    res = _entry(
        [], fake_path, DELTASERVE_STORE=str(tmp_path / "d"), DELTASERVE_CACHE=str(tmp_path / "c")
    )
    assert res.returncode == 0 and "ARGS:serve" in res.stdout
    assert "admin API is off" in res.stderr


def test_entrypoint_refuses_bad_setups(fake_path, tmp_path):
    res = _entry(
        ["serve"],
        fake_path,
        DELTASERVE_STORE="/dev/null/deltas",
        DELTASERVE_CACHE=str(tmp_path / "c"),
    )
    assert res.returncode == 64 and "cannot create /dev/null/deltas" in res.stderr
    res = _entry(
        ["serve"],
        fake_path,
        DELTASERVE_STORE=str(tmp_path / "d"),
        DELTASERVE_CACHE=str(tmp_path / "c"),
        DELTASERVE_ADMIN_TOKEN="short",
    )
    assert res.returncode == 64 and "at least 8" in res.stderr
    assert Settings.model_fields["admin_token"]  # the server enforces the same minimum


def test_entrypoint_passes_other_commands_through(fake_path):
    res = _entry(["inspect", "x.delta.safetensors"], fake_path)
    assert res.returncode == 0 and "ARGS:inspect x.delta.safetensors" in res.stdout
    res = _entry(["echo", "hello"], fake_path)
    assert res.returncode == 0 and res.stdout.strip() == "hello"


def test_grafana_has_the_engine_v2_panels_and_compose_provisions_them():
    """Variants and rows per step, merged / unmerged steps, step seconds and KV slots,
    each a panel on the provisioned Prometheus data source; compose mounts the
    dashboard where the provisioning provider reads it."""
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "deltaserve.json").read_text())
    by_metric: dict[str, list[str]] = {}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for metric in re.findall(r"deltaserve_[a-z_]+", target["expr"]):
                by_metric.setdefault(
                    metric.removesuffix("_bucket")
                    .removesuffix("_sum")
                    .removesuffix("_count")
                    .removesuffix("_total"),
                    [],
                ).append(panel["title"])
    for metric in (
        "deltaserve_step_variants",
        "deltaserve_step_rows",
        "deltaserve_steps",
        "deltaserve_step_seconds",
        "deltaserve_kv_slots_used",
    ):
        assert metric in by_metric, metric
    steps = next(p for p in dash["panels"] if "deltaserve_steps_total" in json.dumps(p))
    assert "by (mode)" in steps["targets"][0]["expr"]  # merged and unmerged apart
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [p["gridPos"] for p in dash["panels"]]  # no two panels overlap
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, (a, b)
    source = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert all(
        p["datasource"]["uid"] == source["uid"] for p in dash["panels"] if p["type"] != "row"
    )
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "deltaserve.yml").read_text()
    )["providers"][0]
    grafana = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
