"""CPU/CUDA parity of the hook path and every scoring path (skipped without a GPU)."""

import pytest
import torch

import zoo
from influence import ClassificationTask, Identity, InfluenceEstimator, LanguageModelingTask, select_parameters
from influence.gradients.hooks import GradientComputer
from influence.scoring import ScoringConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def to(x, device):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to(v, device) for v in x)
    return x.to(device)


def cases():
    x, y = zoo.classification_data(n=9)
    yield "mlp", zoo.mlp(hidden=(7, 6)), ClassificationTask(), zoo.batches(x, y, 4)
    xi, yi = zoo.image_data(n=6)
    yield "cnn", zoo.cnn(), ClassificationTask(), zoo.batches(xi, yi, 3)
    yield "lm", zoo.tiny_lm(), LanguageModelingTask(), zoo.dict_batches(zoo.lm_batch(n=6, labels=True), 3)


CASES = list(cases())
CONFIGS = {
    "auto": ScoringConfig(),
    "materialise": ScoringConfig(strategy="materialise"),
    "factored": ScoringConfig(strategy="factored"),
    "logra": ScoringConfig(projection="factored", projection_dim=4),
    "trak": ScoringConfig(projection="dense", projection_dim=16),
    "bf16": ScoringConfig(precision="bf16"),
}


@pytest.mark.parametrize("name,model,task,loader", CASES, ids=[c[0] for c in CASES])
def test_hook_gradients_cpu_cuda_parity(name, model, task, loader):
    layout = select_parameters(model)
    cpu = GradientComputer(model, task, layout).flat(loader[0])
    import copy

    gpu_model = copy.deepcopy(model).cuda()
    gpu = GradientComputer(gpu_model, task, layout).flat(to(loader[0], "cuda"))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name,model,task,loader", CASES, ids=[c[0] for c in CASES])
def test_scores_cpu_cuda_parity(name, model, task, loader, config):
    import copy

    kw = dict(score_dtype=torch.float64, scoring=CONFIGS[config])
    cpu = InfluenceEstimator(Identity(), task, **kw).fit(model, loader).pairwise_scores(loader[:1])
    gm = copy.deepcopy(model).cuda()
    gl = to(loader, "cuda")
    gpu = InfluenceEstimator(Identity(), task, **kw).fit(gm, gl).pairwise_scores(gl[:1])
    assert gpu.is_cuda
    tol = dict(rtol=2e-2, atol=1e-2) if config == "bf16" else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)
