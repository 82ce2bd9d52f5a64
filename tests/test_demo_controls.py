"""The demo's controls (swapped responses, before fine-tuning), its metric helper on string
labels, and the TaskResult that run_task returns."""

import copy

import pytest
import torch

import influence
from influence.demo.attribution import relative_damping
from influence.demo.controls import swap_responses, untrained_model
from influence.demo.data import Example
from influence.demo.families import make_task
from influence.demo.metrics import chance, class_metrics
from influence.demo.pipeline import DemoConfig, TaskResult, add_lora, run_task
from influence.demo.pretrain import PretrainConfig, pretrain
from influence.demo.report import summary, write_report
from influence.gradients import per_sample_grads
from influence.lm import LORA_PARAMS
from influence.params import select_parameters

TINY_LM = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, steps=5, batch_size=8)
CONFIG = DemoConfig(tasks=("sentiment",), methods=("identity", "exact", "repsim"), scale=0.03,
                    n_queries=5, epochs=1, checkpoints=(), damping_sweep=(),
                    pretrain=PretrainConfig(**TINY_LM))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base, tok, _ = pretrain(CONFIG.pretrain, tmp_path_factory.mktemp("cache"), progress=False)
    before = copy.deepcopy(base.state_dict())
    result = run_task("sentiment", base, tok, CONFIG, progress=False, log=lambda s: None)
    return base, before, result


def identity_scores(model, train_batches, query_batches):
    """Gradient match as the demo's ``identity`` computes it: ``q·g / λ`` (relative damping)."""
    task = influence.LanguageModelingTask()
    layout = select_parameters(model, LORA_PARAMS)
    G = torch.cat([per_sample_grads(model, task, b, layout) for b in train_batches]).double()
    Q = torch.cat([per_sample_grads(model, task, b, layout, objective="measurement")
                   for b in query_batches]).double()
    return Q @ G.T / relative_damping(G, CONFIG.damping_ratio)


# ----------------------------------------------------------------------------- swap_responses
def test_swapped_queries_keep_the_prompt_and_take_another_class_response():
    data = make_task("sentiment", scale=0.05, n_queries=10)
    swapped = swap_responses(data.test, data.train, seed=3)
    assert len(swapped) == len(data.test)
    for q, s in zip(data.test, swapped):
        donor = data.train[s.meta["response_from"]]
        assert s.prompt == q.prompt and s.label == q.label and s.meta["original_response"] == q.response
        assert s.response == donor.response != q.response
        assert s.meta["response_label"] == donor.label != q.label
    assert swap_responses(data.test, data.train, seed=3) == swapped  # deterministic by seed
    assert [s.response for s in swap_responses(data.test, data.train, seed=4)] != [s.response for s in swapped]


def test_swap_works_with_string_labels_and_refuses_a_single_class_pool():
    pool = [Example("p", "yes", "pos"), Example("q", "no", "neg"), Example("r", "maybe", "mid")]
    swapped = swap_responses([Example("x", "yes", "pos")] * 20, pool, seed=0)
    assert {s.meta["response_label"] for s in swapped} == {"neg", "mid"}  # both other classes drawn
    with pytest.raises(ValueError, match="only class in the pool.*at least two classes"):
        swap_responses([Example("x", "yes", "pos")], pool[:1])


# ----------------------------------------------------------------------------- untrained_model
def test_untrained_model_is_the_finetuning_start_or_a_fresh_model_and_leaves_the_base_alone(run):
    base, before, _ = run
    state = copy.deepcopy(base.state_dict())
    start = untrained_model(base, lambda m: add_lora(m, CONFIG), "base", seed=CONFIG.seed)
    torch.manual_seed(CONFIG.seed)
    reference = add_lora(copy.deepcopy(base), CONFIG)  # what run_task fine-tunes from
    assert start.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in start.state_dict().items())
    fresh = untrained_model(base, lambda m: add_lora(m, CONFIG), "random", seed=CONFIG.seed)
    assert not torch.equal(fresh.tok.weight, base.tok.weight) and not fresh.training
    assert all(float(p.detach().abs().max()) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="Invalid init 'trained'. Supported"):
        untrained_model(base, lambda m: m, "trained")
    with pytest.raises(ValueError, match="has no .config"):
        untrained_model(torch.nn.Linear(2, 2), lambda m: m, "random")


# ----------------------------------------------------------------------------- the controls in run_task
def test_control_rows_come_from_the_same_methods_on_an_unchanged_model(run):
    base, before, result = run
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base untouched
    controls = result.summary["controls"]
    assert controls["init"] == "random"
    for control in ("before_finetuning", "swapped_responses"):
        assert set(controls[control]["methods"]) == {"identity", "exact", "repsim"}
        assert all(e["status"] == "ok" for e in controls[control]["methods"].values())
    # before fine-tuning: identity scores of a freshly built random model with LoRA at init
    fresh = untrained_model(base, lambda m: add_lora(m, CONFIG), "random", CONFIG.seed)
    expected = identity_scores(fresh, result.train_batches, result.test_batches)
    got = result.control_scores["before_finetuning"]["identity"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, result.scores["identity"], rtol=1e-2)
    # swapped: the fine-tuned model's scores of the swapped queries
    from influence.demo.data import make_batches

    swapped = make_batches(result.tokenizer, result.swapped, CONFIG.batch_size)
    expected = identity_scores(result.model, result.train_batches, swapped)
    got = result.control_scores["swapped_responses"]["identity"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    train_y = [ex.label for ex in result.data.train]
    metrics = class_metrics(got, train_y, [ex.label for ex in result.data.test])
    assert controls["swapped_responses"]["methods"]["identity"]["acc"] == metrics["acc"]
    follows = class_metrics(got, train_y, [ex.meta["response_label"] for ex in result.swapped])["acc"]
    assert controls["swapped_responses"]["methods"]["identity"]["acc_response"] == follows


def test_report_shows_the_control_rows(run, tmp_path):
    _, _, result = run
    results = {"config": CONFIG.to_dict(), "pretrain": {"num_params": 1}, "seconds": 1.0,
               "tasks": [result.summary]}
    text = summary(results)
    assert "↳ before fine-tuning (random init)" in text and "↳ swapped responses" in text
    assert "k = n_train // n_classes" in text and "mean Acc fine-tuned / before fine-tuning" in text
    report = (write_report(results, tmp_path) / "report.md").read_text()
    assert report.count("↳ swapped responses") == 3  # in the Acc, Cover and AUC tables
    assert "What a method must beat" in report and "20 for harmful" not in report


# ----------------------------------------------------------------------------- TaskResult
def test_run_task_returns_scores_model_and_examples(run):
    _, _, result = run
    assert isinstance(result, TaskResult)
    n_test, n_train = len(result.data.test), len(result.data.train)
    assert {m: tuple(s.shape) for m, s in result.scores.items()} == {
        m: (n_test, n_train) for m in ("identity", "exact", "repsim")}
    # the scores belong to the returned (fine-tuned) model
    expected = identity_scores(result.model, result.train_batches, result.test_batches)
    assert torch.allclose(result.scores["identity"], expected, rtol=1e-5,  # float32 gradients
                          atol=1e-5 * float(expected.abs().max()))
    top = result.top_examples("exact", query=2, k=3)
    row = result.scores["exact"][2]
    assert [j for j, _, _ in top] == torch.argsort(row, descending=True)[:3].tolist()
    assert all(ex is result.data.train[j] and v == float(row[j]) for j, v, ex in top)
    with pytest.raises(KeyError, match="No scores for method 'cg'"):
        result.top_examples("cg", 0)
    report = influence.diagnose(result.estimators["exact"], result.test_batches, compare=None, k=3)
    assert report.ihvp["mean_relative_error"] < 1e-6  # exact is its own reference


# ----------------------------------------------------------------------------- metrics
def test_metrics_accept_string_labels_and_agree_with_integer_codes():
    torch.manual_seed(0)
    scores = torch.randn(6, 9)
    names = ["joy", "anger", "fear"]
    train = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    test = [0, 1, 2, 2, 1, 0]
    by_name = class_metrics(scores, [names[i] for i in train], [names[i] for i in test])
    assert by_name == class_metrics(scores, train, test)
    assert chance([names[i] for i in train], [names[i] for i in test]) == chance(train, test) == pytest.approx(1 / 3)
    assert class_metrics(scores, torch.tensor(train), torch.tensor(test)) == by_name


def test_beats_controls_by_hand():
    from influence.demo.report import MARGIN, beats_controls

    def task(acc, before, swapped):
        ok = lambda a: {"m": {"status": "ok", "acc": a}}  # noqa: E731
        return {"chance": 0.2, "methods": ok(acc), "controls": {
            "before_finetuning": {"methods": ok(before)}, "swapped_responses": {"methods": ok(swapped)}}}

    assert beats_controls(task(0.9, 0.9 - 2 * MARGIN, 0.5), "m") is True
    assert beats_controls(task(0.9, 0.85, 0.5), "m") is False  # no better than an untrained model
    assert beats_controls(task(0.9, 0.3, 0.1), "m") is False  # collapses when the answer changes
    assert beats_controls(task(0.9, 0.3, 0.5), "other") is None


def test_older_attribution_signature_and_repsim_scores_still_work(run):
    """``influence.demo.pipeline.Attribution(model, data, train, test, config)`` and
    ``methods.repsim_scores`` (used by callers written against the earlier API) give the
    scores run_task reports."""
    from influence.demo.methods import repsim_scores
    from influence.demo.pipeline import Attribution

    _, _, result = run
    legacy = Attribution(result.model, None, result.train_batches, result.test_batches, CONFIG)
    S, _ = legacy.scores("exact")
    assert torch.allclose(S, result.scores["exact"], rtol=1e-6, atol=1e-6 * float(S.abs().max()))
    R, name = repsim_scores(result.model, result.train_batches, result.test_batches)
    assert name == "influence.RepresentationSimilarity" and torch.allclose(R, result.scores["repsim"])
