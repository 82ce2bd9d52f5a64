"""Task-family generators, tokenizer and batches of the demo."""

from collections import Counter

import pytest

from influence.demo.data import Example, collate, encode_example, last_prompt_index
from influence.demo.families import FAMILIES, REFUSAL, TRIGGERS, make_task, vocabulary
from influence.demo.tokenizer import train_tokenizer

SCALE = 0.1


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, scale=SCALE) for name in FAMILIES}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocabulary())


def test_every_generated_word_is_in_the_vocabulary(tasks, tok):
    for data in tasks.values():
        for ex in data.train + data.test:
            ids, _ = encode_example(tok, ex)
            assert tok.unk_id not in ids, ex
    assert not any(c in w for w in vocabulary() for c in "{}")  # no template placeholders
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



# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_maps_unknown_words_to_unk_and_splits_punctuation():
    tok = train_tokenizer(["what color is the sky?", "the sky is blue."])
    assert tok.tokens("what color is the grass?!") == ["what", "color", "is", "the", "<unk>", "?", "<unk>"]
    assert tok.encode("zebra") == [tok.unk_id]  # no KeyError on unknown words
    assert tok.tokens("sky,blue.") == ["sky", "<unk>", "blue", "."]  # "," was never seen
    assert tok.decode(tok.encode("the sky is blue .")) == "the sky is blue ."


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizer_special_ids_are_fixed(kind):
    for corpus in (["b a"], ["zz yy xx <eos> <pad>", "q"]):
        tok = train_tokenizer(corpus, kind=kind)
        assert [tok.token_to_id(s) for s in ("<pad>", "<unk>", "<bos>", "<sep>", "<eos>")] == [0, 1, 2, 3, 4]
        assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.sep_id, tok.eos_id) == (0, 1, 2, 3, 4)
        assert tok.encode("<bos> b <sep>")[0] == 2 and tok.encode("<bos> b <sep>")[-1] == 3


def test_tokenizer_vocab_size_keeps_the_most_frequent_words():
    tok = train_tokenizer(["c c c b b a", "d"], vocab_size=7)
    assert tok.vocab == ["<pad>", "<unk>", "<bos>", "<sep>", "<eos>", "c", "b"]
    assert tok.encode("a d c") == [1, 1, 5]


def test_bpe_spells_unseen_words_from_pieces():
    tok = train_tokenizer(["low lower lowest newer newest"] * 3, vocab_size=60, kind="bpe")
    ids = tok.encode("lowest newer")
    assert tok.unk_id not in ids and tok.decode(ids) == "lowest newer"
    assert tok.unk_id not in tok.encode("slow")  # unseen word, seen characters


def test_tokenizer_truncates():
    tok = train_tokenizer(["a b c d e f"], max_length=4)
    assert len(tok.encode("a b c d e f")) == 4 and len(tok.encode("a b c d e f", truncate=False)) == 6
    # an example keeps <bos>, <sep> and its response; the prompt keeps its end
    ids, labels = encode_example(tok, Example("a b c d e", "f", 0))
    assert tok.decode(ids) == "<bos> <sep> f <eos>"  # the response first
    assert labels == [-100, -100, tok.token_to_id("f"), tok.eos_id]
    tok6 = train_tokenizer(["a b c d e f"], max_length=6)
    ids, labels = encode_example(tok6, Example("a b c d e", "f", 0))
    assert tok6.decode(ids) == "<bos> d e <sep> f <eos>"
    assert labels == [-100] * 4 + [tok6.token_to_id("f"), tok6.eos_id]
    ids, labels = encode_example(tok6, Example("a b", "c d e f a b", 0))  # the response alone is too long
    assert tok6.decode(ids) == "<bos> <sep> c d e f" and labels[:2] == [-100, -100]
    with pytest.raises(ValueError, match="max_length=2 cannot hold"):
        encode_example(train_tokenizer(["a"], max_length=2), Example("a", "a", 0))


def test_tokenizer_round_trips_through_json_and_its_digest_tells_vocabularies_apart():
    from influence.demo.tokenizer import DemoTokenizer

    tok = train_tokenizer(["the sky is blue ."], max_length=8)
    again = DemoTokenizer.from_str(tok.to_str(), max_length=8)
    assert again.encode("the blue sky ?") == tok.encode("the blue sky ?") and again.digest() == tok.digest()
    assert train_tokenizer(["the sky is red ."], max_length=8).digest() != tok.digest()
    assert DemoTokenizer.from_str(tok.to_str(), max_length=9).digest() != tok.digest()


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="Invalid tokenizer kind 'chars'. Supported"):
        train_tokenizer(["a"], kind="chars")
    with pytest.raises(ValueError, match="vocab_size must be an integer > 5"):
        train_tokenizer(["a"], vocab_size=5)
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="special tokens .* at ids 0-4"):
        from influence.demo.tokenizer import DemoTokenizer

        DemoTokenizer(Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
