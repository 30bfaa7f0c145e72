"""Compositions: a `model` that names several variants, merged per request.

    "a+b"              sum (task arithmetic) of a and b
    "0.7*a+0.3*b"      weighted sum (a weight may be negative: "a+-0.5*b"; no '+'
                       in a weight: 1e3, not 1e+3)
    "support-mix"      a recipe registered with POST /admin/compositions
                       (members, weights, method: sum | ties | dare-merge)

A composition is served as one more variant: the engine merges its members' sparse
deltas (deltastore/merge.py, the same code as `deltaserve merge`) into one sparse
delta, cached and evicted by bytes like any variant, laid out for mixed steps, and
merged in place when it dominates. Its engine name is canonical (members in name
order, weights written out), so "b+a" and "a+b" share one cache entry.

Recipes are JSON files beside the deltas (`NAME.composition.json`, written
atomically); a name is either a delta or a recipe, never both.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltastore.format import fsync_path
from deltastore.merge import MergeMethod
from deltastore.store import DeltaStore, InvalidName, check_name

RECIPE_SUFFIX = ".composition.json"
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]-?\d+)?"  # no '+': it joins terms
MAX_WEIGHT = 1e6
MAX_EXPRESSION = 1024  # characters of a composition written in `model`
_TERM = re.compile(rf"(?:(?P<w>{_NUMBER})\*)?(?P<name>[^*+\s]+)")


class CompositionError(ValueError):
    """A composition that cannot be served; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_composition"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Composition:
    key: str  # the engine's name for it
    members: tuple[tuple[str, float], ...]  # in name order, weights summed, none zero
    method: MergeMethod = MergeMethod.SUM
    density: float | None = None
    seed: int = 0
    recipe: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "members": [{"name": n, "weight": w} for n, w in self.members],
            "method": self.method.value,
            "density": self.density,
            "seed": self.seed,
        }


def is_expression(model: str) -> bool:
    return "+" in model or "*" in model


def _weight(w: float) -> str:
    """Exact (repr round-trips) and without '+', so a key parses back to itself."""
    return repr(w).replace("e+", "e")


def check_weight(name: str, w: float) -> float:
    if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
        raise CompositionError(f"the weight of {name!r} must be finite, at most {MAX_WEIGHT:g}")
    return w


def canonical(members: dict[str, float]) -> tuple[tuple[tuple[str, float], ...], str]:
    kept = tuple(sorted((n, w) for n, w in members.items() if w != 0.0))
    key = "+".join(n if w == 1.0 else f"{_weight(w)}*{n}" for n, w in kept)
    return kept, key


def parse(expr: str, limit: int) -> Composition:
    """`a+b`, `0.7*a+0.3*b` -> a sum composition; a CompositionError says what is wrong."""
    if len(expr) > MAX_EXPRESSION:
        raise CompositionError(f"a composition is at most {MAX_EXPRESSION} characters")
    members: dict[str, float] = {}
    terms = expr.split("+")
    # "a+-0.5*b" splits into "a", "-0.5*b"; a sign alone ("a++b") is an empty term
    for term in terms:
        m = _TERM.fullmatch(term.strip())
        if not term.strip() or m is None:
            raise CompositionError(
                f"composition {expr!r}: cannot read the term {term!r} "
                "(write NAME, WEIGHT*NAME, joined by '+')"
            )
        name = m.group("name")
        try:
            check_name(name)
        except InvalidName as e:
            raise CompositionError(f"composition {expr!r}: {e}") from None
        w = float(m.group("w")) if m.group("w") is not None else 1.0
        members[name] = members.get(name, 0.0) + check_weight(name, w)
    kept, key = canonical(members)
    if not kept:
        raise CompositionError(f"composition {expr!r}: every weight is 0")
    if len(kept) > limit:
        raise CompositionError(
            f"composition {expr!r}: {len(kept)} members, at most {limit} "
            "(--max-composition-members)"
        )
    return Composition(key, kept)


class Compositions:
    """Resolves a model name to a composition (or None: a plain variant or the base),
    and keeps the registered recipes (files in the store directory)."""

    def __init__(self, store: DeltaStore, limit: int) -> None:
        self.store, self.limit = store, limit
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int] | None, Composition | None]] = {}
        self._parsed: dict[str, Composition] = {}  # expressions read before (per step calls)

    # ------------------------------------------------------------------ recipes

    def path(self, name: str) -> Path:
        return self.store.root / f"{check_name(name)}{RECIPE_SUFFIX}"

    def names(self) -> list[str]:
        return sorted(
            p.name[: -len(RECIPE_SUFFIX)] for p in self.store.root.glob(f"*{RECIPE_SUFFIX}")
        )

    def stamp(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = self.path(name).stat()
        except (FileNotFoundError, InvalidName):
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def recipe(self, name: str) -> Composition | None:
        """The registered recipe `name`, read again when its file changed."""
        stamp = self.stamp(name)
        if stamp is None:
            return None
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            raw = json.loads(self.path(name).read_text())
            comp = self.build(
                name,
                [m["name"] for m in raw["members"]],
                [float(m["weight"]) for m in raw["members"]],
                MergeMethod(raw["method"]),
                raw.get("density"),
                int(raw.get("seed", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            comp = None  # unreadable: served as nothing (404), never half-read
        with self._lock:
            self._cache[name] = (stamp, comp)
        return comp

    def build(
        self,
        name: str,
        members: list[str],
        weights: list[float] | None,
        method: MergeMethod,
        density: float | None,
        seed: int,
    ) -> Composition:
        check_name(name)
        if weights is not None and len(weights) != len(members):
            raise CompositionError(f"{len(weights)} weights for {len(members)} members")
        summed: dict[str, float] = {}
        for m, w in zip(members, weights or [1.0] * len(members), strict=True):
            check_name(m)
            summed[m] = summed.get(m, 0.0) + check_weight(m, float(w))
        kept, _ = canonical(summed)
        if not kept:
            raise CompositionError("a composition needs a member with a non-zero weight")
        if len(kept) > self.limit:
            raise CompositionError(f"{len(kept)} members, at most {self.limit}")
        if density is not None and not 0.0 < density <= 1.0:
            raise CompositionError(f"density must be in (0, 1], got {density}")
        return Composition(name, kept, method, density, seed, recipe=name)

    def register(self, comp: Composition, replace: bool = False) -> None:
        assert comp.recipe is not None
        path = self.path(comp.recipe)
        if path.exists() and not replace:
            raise FileExistsError(f"composition {comp.recipe!r} exists (use replace=true)")
        body = json.dumps({"name": comp.recipe, **comp.describe()}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.store.root, prefix=".recipe-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            fsync_path(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(self.store.root)

    def unregister(self, name: str) -> None:
        self.path(name).unlink()
        fsync_path(self.store.root)

    # ------------------------------------------------------------------ resolving

    def resolve(self, model: str) -> Composition | None:
        """The composition `model` names (an expression or a recipe); None otherwise.
        Raises CompositionError for an expression that cannot be read."""
        if is_expression(model):
            parsed = self._parsed.get(model)
            if parsed is None:
                parsed = parse(model, self.limit)
                if len(self._parsed) >= 4096:  # bounded: clients may write many
                    self._parsed.clear()
                self._parsed[model] = parsed
            return parsed
        return self.recipe(model)  # None when no recipe file has that name

    def source_stamp(self, comp: Composition) -> tuple[Any, ...]:
        """What the composition's merged delta was made from: its recipe file and its
        members' files (a change to any makes a cached merge stale)."""
        recipe = self.stamp(comp.recipe) if comp.recipe else None
        return (recipe, *(self.store.stamp(m) for m, _ in comp.members))
