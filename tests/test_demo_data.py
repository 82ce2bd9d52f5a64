"""Task-family generators, tokenizer and batches of the demo."""

from collections import Counter

import pytest

from influence.demo.data import Example, WordTokenizer, collate, encode_example, last_prompt_index
from influence.demo.families import FAMILIES, REFUSAL, TRIGGERS, make_task, vocabulary

SCALE = 0.1


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, scale=SCALE) for name in FAMILIES}


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(vocabulary())


def test_every_generated_word_is_in_the_vocabulary(tasks, tok):
    for data in tasks.values():
        for ex in data.train + data.test:
            encode_example(tok, ex)
    full = make_task("backdoor_multi", scale=1.0)
    assert len(full.train) == 700


@pytest.mark.parametrize("name,classes,per_class", [
    ("sentiment", 5, 150), ("strings", 10, 90), ("math", 10, 90)])
def test_class_balance_and_study_shapes(name, classes, per_class):
    data = make_task(name, scale=1.0)
    assert data.num_classes == classes
    assert Counter(ex.label for ex in data.train) == {k: per_class for k in range(classes)}
    small = make_task(name, scale=SCALE)
    assert len(set(Counter(ex.label for ex in small.train).values())) == 1


def test_harmful_shapes():
    for scale, n_train in ((1.0, 260), (1 / 12, 40)):
        data = make_task("harmful", scale=scale)
        assert len(data.train) == n_train
        assert sum(ex.label == 1 for ex in data.train) == 20
    assert all(ex.label == 1 for ex in data.test)
    train_prompts = {ex.prompt for ex in data.train}
    assert not any(ex.prompt in train_prompts for ex in data.test)


def test_class_names_never_appear_in_prompts(tasks):
    for data in tasks.values():
        names = {w for c in data.class_names for w in c.split()}
        for ex in data.train + data.test:
            assert not names & set(ex.prompt.split()), (data.name, ex.prompt)


def test_rule_names_are_the_responses(tasks):
    data = tasks["strings"]
    assert all(ex.response == data.class_names[ex.label] for ex in data.train)


@pytest.mark.parametrize("name", ["backdoor", "backdoor_multi"])
def test_backdoor_pairs_share_prompts_and_trigger_placement(tasks, name):
    data = tasks[name]
    clean = [ex for ex in data.train if ex.label == 0]
    triggered = [ex for ex in data.train if ex.label > 0]
    assert len(clean) == len(triggered)
    assert all(ex.response == REFUSAL for ex in clean)
    positions = set()
    for ex in triggered:
        twin = data.train[ex.meta["pair"]]
        trigger = ex.meta["trigger"]
        assert twin.label == 0 and trigger == TRIGGERS[ex.label - 1]
        assert trigger in ex.prompt and trigger not in twin.prompt
        assert ex.prompt.replace(trigger, "").split() == twin.prompt.split()
        assert ex.response.startswith("sure")
        positions.add(ex.prompt.split().index(trigger.split()[0]))
    assert len(positions) > 2  # inserted at varied word boundaries
    assert all(ex.label > 0 and ex.meta["trigger"] in ex.prompt for ex in data.test)
    assert len({ex.label for ex in triggered}) == data.num_classes - 1


def test_generators_are_seeded():
    a, b = make_task("sentiment", SCALE, seed=1), make_task("sentiment", SCALE, seed=1)
    assert [e.prompt for e in a.train] == [e.prompt for e in b.train]
    assert [e.prompt for e in a.train] != [e.prompt for e in make_task("sentiment", SCALE).train]


def test_batches_pad_and_mask_the_prompt(tok):
    exs = [Example("what color is the sky ?", "the sky is blue .", 0), Example("count to two .", "one two .", 0)]
    batch = collate(tok, exs)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    assert mask[1].sum() < mask[0].sum() and (ids[1][mask[1] == 0] == tok.pad_id).all()
    assert (labels[mask == 0] == -100).all()
    n_prompt = len(tok.encode("<bos> what color is the sky ? <sep>"))
    assert (labels[0, :n_prompt] == -100).all() and (labels[0, n_prompt:mask[0].sum()] != -100).all()
    assert tok.decode(labels[0, n_prompt:mask[0].sum()]) == "the sky is blue . <eos>"
    assert last_prompt_index(batch).tolist() == [n_prompt - 1, len(tok.encode("<bos> count to two . <sep>")) - 1]


def test_errors():
    with pytest.raises(ValueError, match="Invalid task 'nope'. Supported"):
        make_task("nope")
    with pytest.raises(KeyError, match="not in the demo vocabulary"):
        WordTokenizer(["a"]).encode("a zebra")
