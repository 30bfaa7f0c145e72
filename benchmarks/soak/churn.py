"""The admin churner: preload, evict, pin, unpin, replace, delete and re-upload on a
thread of its own, and its view of which churned variants exist."""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks.soak.fixtures import Variant

if TYPE_CHECKING:  # the soak's counters; run.py imports this module
    from benchmarks.soak.run import Tally

# admin answers that are by design under load, not failures: (op, status, error code)
EXPECTED_ADMIN_REFUSALS = {("evict", 409, "in_use")}


def _is_json(r: httpx.Response) -> bool:
    try:
        return isinstance(r.json(), dict)
    except ValueError:
        return False


class Presence:
    """The churner's view of which churned variants exist. Each change of a name bumps
    its epoch: before a DELETE is sent (the name may be gone from then on) and after
    an upload is answered 201 (it exists from then on). A request's 404 is expected
    when the name was absent, or changed, at some point between its start and its end."""

    def __init__(self, variants: list[Variant], stored: set[str] | None = None) -> None:
        self._lock = threading.Lock()
        self.present = {
            v.name: v.initially_present if stored is None else v.name in stored
            for v in variants
            if v.churn
        }
        self.epoch = dict.fromkeys(self.present, 0)

    def snapshot(self, name: str) -> tuple[bool, int]:
        with self._lock:
            return self.present[name], self.epoch[name]

    def set(self, name: str, present: bool) -> None:
        with self._lock:
            self.present[name] = present
            self.epoch[name] += 1

    def names(self, present: bool) -> list[str]:
        with self._lock:
            return [n for n, p in self.present.items() if p == present]


class Churner:
    """Admin churn until `end` on a thread of its own: one operation at a time, a short
    random pause between."""

    def __init__(
        self,
        url: str,
        token: str,
        variants: list[Variant],
        presence: Presence,
        tally: Tally,
        end: float,
        pause_s: float,
        seed: int,
    ) -> None:
        self.thread = threading.Thread(target=self.run, name="soak-churner", daemon=True)
        self.client = httpx.Client(
            base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"}
        )
        self.stable = [v.name for v in variants if v.file is not None and not v.churn]
        self.cycled = [v.name for v in variants if v.churn and v.initially_present]
        self.extra = [v.name for v in variants if v.churn and not v.initially_present]
        self.data = {v.name: v.file.read_bytes() for v in variants if v.file is not None}
        self.presence, self.tally, self.end = presence, tally, end
        self.pause_s, self.rng = pause_s, random.Random(seed)
        self.pinned: set[str] = set()
        self.error: BaseException | None = None

    def _call(self, kind: str, method: str, path: str, ok: int, **kw: Any) -> bool:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            key, detail = f"{kind} {type(e).__name__}", str(e)
        else:
            if r.status_code == ok:
                with self.tally.lock:
                    self.tally.admin_ops[kind] += 1
                return True
            key, detail = f"{kind} {r.status_code}", r.text[:300]
            code = r.json().get("error", {}).get("code") if _is_json(r) else None
            if (kind, r.status_code, code) in EXPECTED_ADMIN_REFUSALS:
                with self.tally.lock:
                    self.tally.admin_refused[f"{key} {code}"] += 1
                return False
        with self.tally.lock:
            self.tally.admin_failures[key] += 1
        self.tally.example("admin_failures", {"op": kind, "path": path, "error": detail})
        return False

    def _upload(self, kind: str, name: str, replace: bool) -> bool:
        params = {"name": name, **({"replace": "true"} if replace else {})}
        return self._call(
            kind, "POST", "/admin/deltas", 201, params=params, content=self.data[name]
        )

    def _delete_variant(self, kind: str, name: str) -> bool:
        self.presence.set(name, False)  # from now on a 404 for it is expected
        self.pinned.discard(name)  # a delete unpins
        return self._call(kind, "DELETE", f"/admin/deltas/{name}", 200)

    def step(self) -> None:
        present = self.stable + self.presence.names(True)
        kind = self.rng.choice(
            ["preload", "evict", "pin", "unpin", "replace", "cycle", "extra", "extra"]
        )
        if kind in ("preload", "pin", "replace"):
            name = self.rng.choice(present)
            if kind == "replace":
                self._upload(kind, name, replace=True)
            elif self._call(kind, "POST", f"/admin/deltas/{name}/{kind}", 200) and kind == "pin":
                self.pinned.add(name)
        elif kind == "unpin":
            name = self.rng.choice(sorted(self.pinned) or present)
            if self._call(kind, "POST", f"/admin/deltas/{name}/unpin", 200):
                self.pinned.discard(name)
        elif kind == "evict":
            choices = [n for n in present if n not in self.pinned]
            if choices:  # evicting a pinned variant is refused (409) by design
                self._call(kind, "POST", f"/admin/deltas/{self.rng.choice(choices)}/evict", 200)
        elif kind == "cycle" and self.cycled:  # delete, then upload the same bytes again
            name = self.rng.choice(self.cycled)
            if self.presence.snapshot(name)[0]:
                self._delete_variant("cycle-delete", name)
                time.sleep(self.rng.uniform(0, self.pause_s))
            if self._upload("cycle-upload", name, replace=False):
                self.presence.set(name, True)
        elif kind == "extra" and self.extra:  # an extra variant comes or goes
            name = self.rng.choice(self.extra)
            if self.presence.snapshot(name)[0]:
                self._delete_variant("extra-delete", name)
            elif self._upload("extra-upload", name, replace=False):
                self.presence.set(name, True)

    def run(self) -> None:
        try:
            while time.monotonic() < self.end:
                self.step()
                time.sleep(self.rng.uniform(0, self.pause_s))
        except BaseException as e:  # reported by run_soak
            self.error = e
        finally:
            self.client.close()


def stored_variants(url: str, admin_token: str) -> tuple[set[str], set[str]]:
    """The variants in the server's store, and the pinned ones (admin API)."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    r = httpx.get(f"{url}/admin/deltas", headers=headers, timeout=60)
    r.raise_for_status()
    infos = r.json()
    return {d["name"] for d in infos}, {d["name"] for d in infos if d["pinned"]}
