"""Singular-value tuning of single layers: exact at initialisation, the three computation paths agree."""

import pytest
import torch
from torch import nn

from SSAMSegmentLib.model.svd_linear import SingularValueTuned


def _perturb(layer: SingularValueTuned, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.scale.add_(torch.randn(layer.scale.shape, generator=generator) * 0.3)
        layer.shift.add_(torch.randn(layer.shift.shape, generator=generator) * 0.3)


LAYERS = [
    lambda: nn.Linear(48, 80),
    lambda: nn.Linear(80, 48, bias=False),
    lambda: nn.Conv2d(12, 20, kernel_size=3, padding=1),
    lambda: nn.Conv2d(12, 20, kernel_size=3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(20, 8, kernel_size=1),
    lambda: nn.Conv2d(16, 16, kernel_size=3, padding=1, groups=16),  # depthwise, as in TinyViT
]


def _input(layer, batch=2):
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, 7, layer.in_features)
    return torch.randn(batch, layer.in_channels, 9, 11)


@pytest.mark.parametrize("make", LAYERS)
def test_initial_layer_equals_pretrained(make):
    torch.manual_seed(0)
    layer = make()
    x = _input(layer)
    expected = layer(x)
    tuned = SingularValueTuned(layer)
    assert tuned.scale.shape == tuned.s.shape and torch.all(tuned.scale == 1) and torch.all(tuned.shift == 0)
    torch.testing.assert_close(tuned(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tuned.tuned_weight(), layer.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", LAYERS)
def test_factored_rebuilt_and_merged_paths_agree(make):
    torch.manual_seed(1)
    tuned = SingularValueTuned(make())
    _perturb(tuned)
    x = _input(tuned.layer)

    rebuilt_weight = tuned.tuned_weight()
    if isinstance(tuned.layer, nn.Linear):
        reference = nn.functional.linear(x, rebuilt_weight, tuned.layer.bias)
    else:
        reference = tuned.layer._conv_forward(x, rebuilt_weight, tuned.layer.bias)

    outputs = {"auto": tuned(x)}
    if not (isinstance(tuned.layer, nn.Conv2d) and tuned.layer.groups != 1):
        outputs["factored"] = tuned._factored(x)
    tuned.merge()
    outputs["merged"] = tuned(x)
    for name, output in outputs.items():
        torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4, msg=name)


def test_factored_and_rebuilt_gradients_agree():
    torch.manual_seed(2)
    tuned = SingularValueTuned(nn.Conv2d(6, 10, kernel_size=3, padding=1))
    _perturb(tuned)
    x = torch.randn(2, 6, 5, 5)
    grads = []
    for path in ("factored", "rebuilt"):
        tuned.zero_grad()
        if path == "factored":
            out = tuned._factored(x)
        else:
            out = tuned.layer._conv_forward(x, tuned.tuned_weight(), tuned.layer.bias)
        (out ** 2).sum().backward()
        grads.append((tuned.scale.grad.clone(), tuned.shift.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tuned.layer.weight.grad is None  # the pretrained weight is frozen


def test_path_choice_follows_cost():
    tuned = SingularValueTuned(nn.Linear(64, 256))
    few_tokens, many_tokens = torch.randn(1, 2, 64), torch.randn(64, 1024, 64)
    assert tuned.factored_is_cheaper(few_tokens, training=False)
    assert not tuned.factored_is_cheaper(many_tokens, training=False)
    # A training step also pays the backward pass: the rebuilt path's weight gradient makes a rectangular layer
    # cheaper factored even for many tokens, a square one not; 1x1 convolutions keep the forward rule.
    assert tuned.factored_is_cheaper(many_tokens, training=True)
    assert not SingularValueTuned(nn.Linear(128, 128)).factored_is_cheaper(torch.randn(8, 1024, 128), training=True)
    conv = SingularValueTuned(nn.Conv2d(64, 256, 1))
    assert not conv.factored_is_cheaper(torch.randn(1, 64, 128, 128), training=True)
    with torch.no_grad():
        assert not tuned.factored_is_cheaper(many_tokens), "without gradients the forward rule applies"
    assert tuned.factored_is_cheaper(many_tokens), "with gradients and trained a, b the training rule applies"
    tuned.scale.requires_grad_(False)
    tuned.shift.requires_grad_(False)
    assert not tuned.factored_is_cheaper(many_tokens), "frozen a, b: nothing to differentiate"


def test_training_path_choice_leaves_gradients_unchanged():
    """A whole TinyViT S-SAM model: gradients of every trained tensor are the same whether each layer is chosen by
    the training-aware rule or by forward multiply-adds only, and the two rules do pick different paths."""
    import SSAMSegmentLib

    torch.manual_seed(4)
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu").train()
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape) * 0.05)
    images = torch.rand(2, 3, 256, 256)
    text = torch.randn(2, model.text_dim)
    layers = [m for m in model.image_encoder.modules() if isinstance(m, SingularValueTuned)]
    gradients, factored_calls = [], []
    for training_rule in (True, False):
        calls = []
        for layer in layers:
            def choose(x, layer=layer, rule=training_rule):
                factored = SingularValueTuned.factored_is_cheaper(layer, x, training=None if rule else False)
                calls.append(factored)
                return factored
            layer.factored_is_cheaper = choose
        model.zero_grad()
        model(images, text).float().pow(2).mean().backward()
        gradients.append([p.grad.clone() for p in model.trainable_parameters()])
        factored_calls.append(sum(calls))
        for layer in layers:
            del layer.factored_is_cheaper
    assert factored_calls[0] > factored_calls[1], "the training rule factors layers the forward rule rebuilds"
    for got, expected in zip(*gradients):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_relu_keeps_singular_values_non_negative():
    tuned = SingularValueTuned(nn.Linear(10, 10))
    with torch.no_grad():
        tuned.shift.fill_(-1e6)
    assert torch.all(tuned.tuned_singular_values() == 0)
    assert torch.count_nonzero(tuned.tuned_weight()) == 0


def test_merge_keeps_training_state():
    torch.manual_seed(3)
    tuned = SingularValueTuned(nn.Linear(16, 16))
    _perturb(tuned)
    tuned.merge()
    tuned.unmerge()
    x = torch.randn(4, 16)
    tuned(x).sum().backward()
    assert tuned.scale.grad is not None and tuned.scale.grad.abs().sum() > 0


def test_rejects_other_layers():
    with pytest.raises(TypeError):
        SingularValueTuned(nn.LayerNorm(4))
