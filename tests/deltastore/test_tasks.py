"""The generated tasks: deterministic, disjoint splits, answers that follow from the prompt."""

import json
import re

import pytest

from deltastore import tasks
from deltastore.tasks import TASKS, splits, topic


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_fixed_and_disjoint(task):
    train, val, test = splits(task, n_train=200, n_val=32, n_test=32)
    assert (len(train), len(val), len(test)) == (200, 32, 32)
    assert splits(task, n_train=200, n_val=32, n_test=32) == (train, val, test)
    prompts = [{e.prompt for e in s} for s in (train, val, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2]
    assert not prompts[1] & prompts[2]
    assert len({e.answer for e in test}) > 1  # not one constant answer


def test_answers_follow_from_prompts():
    for e in splits("arith", 50, 8, 8)[2]:
        a, b = (int(x) for x in e.prompt.split("What is ")[1].split("?")[0].split(" + "))
        assert e.answer == str(a + b)
    for task in ("extract", "extract-v1", "extract-phrasings"):
        for e in splits(task, 50, 8, 8)[2]:
            obj = json.loads(e.answer)
            assert set(obj) == {"name", "age", "city"}
            assert obj["name"] in e.prompt and obj["city"] in e.prompt
            assert str(obj["age"]) in e.prompt
    labels = {"food", "money", "music", "sports", "weather"}
    assert {e.answer for e in topic(200)} == labels


def test_a_split_too_large_for_the_task_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        splits("topic", n_train=512, n_val=64, n_test=5000)


def _patterns(templates) -> list[re.Pattern[str]]:
    """Each template as a regex over any name, age, city and job."""
    out = []
    for make in templates:
        for pronoun in ("He", "She", "They"):
            text = re.escape(make("QNAMEQ", pronoun, 99999, "QCITYQ", "QJOBQ"))
            for key in ("QNAMEQ", "99999", "QCITYQ", "QJOBQ"):
                text = text.replace(key, "(.+)", 1).replace(key, r"\S+")
            out.append(re.compile(text))
    return out


def test_extraction_is_widened_and_its_held_out_phrasings_are_new():
    train = [e.prompt.removeprefix(tasks.EXTRACT_PROMPT) for e in splits("extract")[0]]
    cities = {json.loads(e.answer)["city"] for e in splits("extract")[0]}
    assert {"Buenos Aires", "Rio de Janeiro"} <= cities  # multi-word cities
    # the sentence a user saw answered wrongly has the shape of a training sentence now
    training = _patterns(tasks._TEMPLATES)
    assert any(p.fullmatch("Mateo lives in Buenos Aires. He is 45.") for p in training)
    assert any(
        s.index(json.loads(e.answer)["city"]) < s.index(json.loads(e.answer)["name"])
        for s, e in zip(train, splits("extract")[0], strict=True)
    )  # city before name
    # every training sentence comes from a training template; no held-out one does
    assert all(any(p.fullmatch(s) for p in training) for s in train)
    held_out = [e.prompt.removeprefix(tasks.EXTRACT_PROMPT) for e in splits("extract-phrasings")[2]]
    assert not any(p.fullmatch(s) for p in training for s in held_out)
    held_out_patterns = [_patterns([t]) for t in tasks._TEMPLATES_HELD_OUT]
    used = {
        i
        for s in held_out
        for i, ps in enumerate(held_out_patterns)
        if any(p.fullmatch(s) for p in ps)
    }
    assert used == set(range(len(tasks._TEMPLATES_HELD_OUT)))  # all six phrasings in the test split
    # the first form of the task is the one the fidelity study measured: 3 phrasings
    v1 = [e.prompt.removeprefix(tasks.EXTRACT_PROMPT) for e in splits("extract-v1")[0]]
    assert all(any(p.fullmatch(s) for p in _patterns(tasks._TEMPLATES_V1)) for s in v1)
