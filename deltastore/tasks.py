"""Small generated tasks (fixed seeds, nothing downloaded): the training data of the
demo variants, and of the benchmark fine-tunes."""

from __future__ import annotations

import json
import random

from deltastore.calib import Example

_NAMES = [  # (name, pronoun)
    ("Alice", "She"),
    ("Bruno", "He"),
    ("Chen", "He"),
    ("Dara", "She"),
    ("Elif", "She"),
    ("Farid", "He"),
    ("Greta", "She"),
    ("Hugo", "He"),
    ("Ines", "She"),
    ("Jomo", "He"),
    ("Kira", "She"),
    ("Luca", "He"),
    ("Mina", "She"),
    ("Nils", "He"),
    ("Omar", "He"),
    ("Priya", "She"),
    ("Quinn", "They"),
    ("Rosa", "She"),
    ("Sami", "He"),
    ("Tara", "She"),
]
_CITIES = ["Lisbon", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Hanoi", "Dakar", "Riga"]
# multi-word cities, only in the widened task (`extract`)
_CITIES_WIDE = [
    *_CITIES,
    "Buenos Aires",
    "New York",
    "Rio de Janeiro",
    "Cape Town",
    "Kuala Lumpur",
    "Hong Kong",
    "Mexico City",
    "San Diego",
    "Tel Aviv",
    "Addis Ababa",
]
_JOBS = ["baker", "pilot", "nurse", "farmer", "chemist", "tailor", "judge", "welder"]
EXTRACT_PROMPT = "Extract name, age and city as JSON: "


def arithmetic(n: int, seed: int = 0) -> list[Example]:
    """Two-digit additions answered with the bare number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(Example(f"What is {a} + {b}? Answer with the number only.", str(a + b)))
    return out


def _is(pronoun: str) -> str:
    return "are" if pronoun == "They" else "is"


def _possessive(pronoun: str) -> str:
    return {"He": "his", "She": "her", "They": "their"}[pronoun]


# Each template: (name, pronoun, age, city, job) -> sentence. The first three are the
# task's first form (`extract-v1`, what the fidelity study measured); the others put
# the city before the name or the age after the city.
_TEMPLATES_V1 = (
    lambda n, p, a, c, j: f"{n} is a {a}-year-old {j} who lives in {c}.",
    lambda n, p, a, c, j: f"Living in {c}, {n} works as a {j} and is {a} years old.",
    lambda n, p, a, c, j: f"At {a}, {n} the {j} moved to {c}.",
)
_TEMPLATES = (
    *_TEMPLATES_V1,
    lambda n, p, a, c, j: f"{n} lives in {c}. {p} {_is(p)} {a}.",
    lambda n, p, a, c, j: f"In {c}, {n} works as a {j}; {p.lower()} turned {a} last month.",
    lambda n, p, a, c, j: f"{c} is where {n}, aged {a}, works as a {j}.",
    lambda n, p, a, c, j: f"{n} the {j} grew up in {c} and is now {a} years old.",
)
# Phrasings never used in training: the held-out set (`extract-phrasings`) measures
# whether the fine-tune learnt the task or the templates.
_TEMPLATES_HELD_OUT = (
    lambda n, p, a, c, j: f"Meet {n}: {a} years old and based in {c}.",
    lambda n, p, a, c, j: f"{n} ({a}) has spent {_possessive(p)} whole life in {c}.",
    lambda n, p, a, c, j: f"The {j} from {c}, {n}, {_is(p)} {a}.",
    lambda n, p, a, c, j: f"{n} moved to {c} years ago and {_is(p)} {a} now.",
    lambda n, p, a, c, j: f"Ask anyone in {c} about {n}, the {a}-year-old {j}.",
    lambda n, p, a, c, j: (
        f"{p} {_is(p)} {a}, {p.lower()} {'live' if p == 'They' else 'lives'} "
        f"in {c}, and {_possessive(p)} name is {n}."
    ),
)


def _extraction(n: int, seed: int, templates: tuple, cities: list[str]) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        (name, pronoun), city, job = rng.choice(_NAMES), rng.choice(cities), rng.choice(_JOBS)
        age = rng.randint(19, 88)
        sentence = rng.choice(templates)(name, pronoun, age, city, job)
        answer = json.dumps({"name": name, "age": age, "city": city})
        out.append(Example(EXTRACT_PROMPT + sentence, answer))
    return out


def extraction(n: int, seed: int = 0) -> list[Example]:
    """A sentence about a person -> one line of JSON with name, age and city: seven
    phrasings (the city before the name, the age after the city, multi-word cities)."""
    return _extraction(n, seed, _TEMPLATES, _CITIES_WIDE)


def extraction_v1(n: int, seed: int = 0) -> list[Example]:
    """The task's first form: three phrasings, one-word cities (the fidelity study's
    and the serving benchmarks' fine-tunes)."""
    return _extraction(n, seed, _TEMPLATES_V1, _CITIES)


def extraction_phrasings(n: int, seed: int = 0) -> list[Example]:
    """The extraction task in six phrasings no training split uses (held out)."""
    return _extraction(n, seed, _TEMPLATES_HELD_OUT, _CITIES_WIDE)


_TOPICS = {  # topic -> (subjects, predicates): any pairing is a sentence on the topic
    "sports": (
        ["The striker", "Our team", "The goalkeeper", "The coach", "The referee", "The captain"],
        [
            "scored twice before half time",
            "lost the final on penalties",
            "trained hard for the derby",
            "was sent off in the second half",
            "won the league by three points",
            "missed an open goal",
        ],
    ),
    "food": (
        ["The chef", "My grandmother", "The baker", "Our neighbour", "The waiter", "The cook"],
        [
            "baked a lemon cake for the party",
            "added too much salt to the soup",
            "grilled the fish with garlic and butter",
            "served the noodles far too spicy",
            "sliced ripe tomatoes for the salad",
            "burnt the rye bread again",
        ],
    ),
    "weather": (
        ["The forecast", "The radio", "The pilot", "The farmer", "The ranger", "The newspaper"],
        [
            "warned of heavy rain over the weekend",
            "said the fog would not lift until noon",
            "expected snow across the valley",
            "called it the hottest July on record",
            "predicted thunderstorms by the evening",
            "promised sunshine and a light breeze",
        ],
    ),
    "music": (
        ["The band", "The choir", "The violinist", "The drummer", "The orchestra", "The singer"],
        [
            "played the new album live",
            "rehearsed the symphony all morning",
            "sang a hymn in four parts",
            "closed the concert with a long solo",
            "tuned up before the overture",
            "recorded the song in a small studio",
        ],
    ),
    "money": (
        ["The bank", "My landlord", "The investor", "The accountant", "The council", "The firm"],
        [
            "raised the interest rate again",
            "paid off the loan two years early",
            "sold the shares after the report",
            "put a tenth of the salary into savings",
            "put the rent up by fifty euros",
            "cut the pension fund by a third",
        ],
    ),
}
_OPENERS = ["", "Yesterday ", "According to Omar, ", "Last year ", "As expected, ", "Sadly, "]


def topic(n: int, seed: int = 0) -> list[Example]:
    """A sentence -> its topic, one of five lower-case labels."""
    rng = random.Random(seed)
    labels = sorted(_TOPICS)
    out = []
    for _ in range(n):
        label = rng.choice(labels)
        subjects, predicates = _TOPICS[label]
        opener, subject = rng.choice(_OPENERS), rng.choice(subjects)
        if opener:
            subject = subject[0].lower() + subject[1:]
        sentence = f"{opener}{subject} {rng.choice(predicates)}."
        prompt = f"Classify the topic as {', '.join(labels)}. Sentence: {sentence} Topic:"
        out.append(Example(prompt, label))
    return out


TASKS = {
    "arith": arithmetic,
    "extract": extraction,
    "extract-v1": extraction_v1,
    "extract-phrasings": extraction_phrasings,
    "topic": topic,
}


def splits(
    task: str, n_train: int = 512, n_val: int = 64, n_test: int = 64
) -> tuple[list[Example], list[Example], list[Example]]:
    """Fixed train / validation / test examples of a task (seeds 0, 1, 2); validation
    and test prompts that also occur in train, or test ones in validation, are dropped
    and replaced, so the three are disjoint."""
    make = TASKS[task]
    train = make(n_train, 0)
    seen = {e.prompt for e in train}
    out: list[list[Example]] = [train]
    for seed, n in ((1, n_val), (2, n_test)):
        picked: list[Example] = []
        pool = make(n * 20, seed)
        for e in pool:
            if e.prompt not in seen:
                seen.add(e.prompt)
                picked.append(e)
                if len(picked) == n:
                    break
        if len(picked) < n:
            raise ValueError(
                f"task {task}: only {len(picked)} distinct examples for a split of {n}"
            )
        out.append(picked)
    return out[0], out[1], out[2]
