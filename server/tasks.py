"""Small generated tasks (fixed seeds, nothing downloaded): the training data of the
demo variants, and of the benchmark fine-tunes."""

from __future__ import annotations

import json
import random

from deltastore.calib import Example

_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Elif",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jomo",
    "Kira",
    "Luca",
    "Mina",
    "Nils",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
]
_CITIES = ["Lisbon", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Hanoi", "Dakar", "Riga"]
_JOBS = ["baker", "pilot", "nurse", "farmer", "chemist", "tailor", "judge", "welder"]


def arithmetic(n: int, seed: int = 0) -> list[Example]:
    """Two-digit additions answered with the bare number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(Example(f"What is {a} + {b}? Answer with the number only.", str(a + b)))
    return out


def extraction(n: int, seed: int = 0) -> list[Example]:
    """A sentence about a person -> one line of JSON with name, age and city."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
        age = rng.randint(19, 88)
        sentence = rng.choice(
            [
                f"{name} is a {age}-year-old {job} who lives in {city}.",
                f"Living in {city}, {name} works as a {job} and is {age} years old.",
                f"At {age}, {name} the {job} moved to {city}.",
            ]
        )
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append(Example(f"Extract name, age and city as JSON: {sentence}", answer))
    return out
