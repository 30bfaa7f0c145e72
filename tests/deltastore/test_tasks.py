"""The generated tasks: deterministic, disjoint splits, answers that follow from the prompt."""

import json

import pytest

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
    for e in splits("extract", 50, 8, 8)[2]:
        obj = json.loads(e.answer)
        assert obj["name"] in e.prompt and obj["city"] in e.prompt and str(obj["age"]) in e.prompt
    labels = {"food", "money", "music", "sports", "weather"}
    assert {e.answer for e in topic(200)} == labels


def test_a_split_too_large_for_the_task_is_an_error():
    with pytest.raises(ValueError, match="distinct"):
        splits("topic", n_train=512, n_val=64, n_test=5000)
