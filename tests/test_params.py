import pytest
import torch

import influence
from influence.params import ParameterLayout, parameter_fingerprint, select_parameters

import zoo


def test_trainable_default_skips_frozen():
    model = zoo.frozen_mlp()
    layout = select_parameters(model)
    assert layout.names == ("2.weight", "2.bias")
    assert layout.num_params == 3 * 5 + 3


def test_patterns_match_parameter_and_module_names():
    model = zoo.mlp(hidden=(5,))
    assert select_parameters(model, "2").names == ("2.weight", "2.bias")
    assert select_parameters(model, ["*.bias"]).names == ("0.bias", "2.bias")
    assert select_parameters(model, "0.weight").names == ("0.weight",)
    # patterns may name frozen parameters explicitly
    assert select_parameters(zoo.frozen_mlp(), "0").names == ("0.weight", "0.bias")


def test_unmatched_pattern_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no parameter.*Available parameters: 0.weight, 0.bias"):
        select_parameters(zoo.mlp(), ["lora_*"])


def test_no_trainable_parameters_is_an_error():
    model = zoo.mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_parameters(model)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="params must be"):
        select_parameters(zoo.mlp(), 3)


def test_flatten_unflatten_round_trip_and_offsets():
    model = zoo.mlp(hidden=(5,))
    layout = select_parameters(model)
    assert layout.offsets == (0, 20, 25, 40)
    flat = torch.randn(3, layout.num_params, dtype=torch.float64)
    parts = layout.unflatten(flat)
    assert parts["0.weight"].shape == (3, 5, 4)
    assert torch.equal(layout.flatten(parts, batch_dims=1), flat)
    assert layout.module_blocks() == {"0": slice(0, 25), "2": slice(25, 43)}
    assert ParameterLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="expected a last dimension of 43"):
        layout.unflatten(torch.zeros(3, 40))


def test_tied_parameters_appear_once():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert select_parameters(model).names == ("emb.weight",)


def test_fingerprint_detects_changes_and_permutations():
    model = zoo.mlp()
    layout = select_parameters(model)
    before = parameter_fingerprint(model, layout)
    assert parameter_fingerprint(model, layout) == before
    with torch.no_grad():
        w = model[0].weight
        w.copy_(w.flip(0))  # same values, permuted
    assert parameter_fingerprint(model, layout) != before
