from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.models import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    ScaledCoefficients,
    build_backbone,
    compound_coefficients,
    count_macs,
    count_params,
    flops_constraint_ok,
    flops_ratio,
    resolve_efficientnet_coefficients,
)


def test_paper_defaults():
    assert (DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA) == (1.2, 1.1, 1.15)


def test_phi_zero_is_the_baseline():
    assert compound_coefficients(phi=0) == ScaledCoefficients(1.0, 1.0, 224)


def test_phi_one_scales_depth_width_and_rounds_resolution_to_8():
    c = compound_coefficients(phi=1)
    assert c.depth_mult == pytest.approx(1.2)
    assert c.width_mult == pytest.approx(1.1)
    assert c.resolution == 256  # 224 * 1.15 = 257.6 -> nearest multiple of 8


def test_phi_two_and_custom_bases():
    c = compound_coefficients(phi=2)
    assert (c.depth_mult, c.width_mult) == (pytest.approx(1.44), pytest.approx(1.21))
    assert c.resolution == 296  # 224 * 1.3225 = 296.24
    c = compound_coefficients(phi=1, alpha=1.0, beta=1.0, gamma=1.0, base_resolution=300)
    assert c == ScaledCoefficients(1.0, 1.0, 304)  # 300 -> 37.5 * 8 rounds half up


@pytest.mark.parametrize("phi", [0.5, 1.5, 3, 4.7])
def test_resolution_is_a_multiple_of_8_nearest_to_gamma_power(phi):
    c = compound_coefficients(phi=phi)
    assert c.resolution % 8 == 0
    assert abs(c.resolution - 224 * 1.15**phi) <= 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"phi": math.nan},
        {"phi": 1, "alpha": 0.9},
        {"phi": 1, "beta": 0},
        {"phi": 1, "gamma": math.inf},
        {"phi": 1, "base_resolution": 0},
    ],
)
def test_bad_compound_inputs_are_value_errors(kwargs):
    with pytest.raises(ValueError):
        compound_coefficients(**kwargs)


def test_flops_ratio_and_constraint():
    assert flops_ratio(1.2, 1.1, 1.15) == pytest.approx(1.2 * 1.21 * 1.3225)
    assert flops_constraint_ok(alpha=1.2, beta=1.1, gamma=1.15)  # 1.92, within 0.1 of 2
    assert flops_constraint_ok(1.2, 1.1, 1.15)
    assert not flops_constraint_ok(alpha=1.2, beta=1.1, gamma=1.15, tolerance=0.05)
    assert not flops_constraint_ok(alpha=1.5, beta=1.2, gamma=1.2)
    with pytest.raises(ValueError):
        flops_constraint_ok(alpha=1.2, beta=1.1, gamma=1.15, tolerance=-1)


def test_resolve_efficientnet_coefficients():
    assert resolve_efficientnet_coefficients() == ScaledCoefficients(1.0, 1.0, 224)
    free = resolve_efficientnet_coefficients(width_mult=1.4, resolution=320)
    assert free == ScaledCoefficients(1.4, 1.0, 320)
    assert resolve_efficientnet_coefficients(phi=1) == compound_coefficients(phi=1)
    assert resolve_efficientnet_coefficients(phi=1, gamma=1.0).resolution == 224
    with pytest.raises(ValueError, match="not both"):
        resolve_efficientnet_coefficients(phi=1, width_mult=1.1)
    with pytest.raises(ValueError, match="need phi"):
        resolve_efficientnet_coefficients(alpha=1.3)
    with pytest.raises(ValueError, match="resolution"):
        resolve_efficientnet_coefficients(resolution=224.0)
    with pytest.raises(ValueError, match="width_mult"):
        resolve_efficientnet_coefficients(width_mult=-1.0)


def test_count_params_counts_frozen_and_shared_once():
    shared = nn.Linear(10, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model[0].bias.requires_grad_(False)
    assert count_params(model) == 10 * 5 + 5


def test_count_macs_is_exact_for_a_small_net_and_restores_modes():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(8, 4),
    )
    model.train()
    model[1].eval()  # a frozen norm layer, as optim.freeze_stages leaves it
    macs = count_macs(model, resolution=16)
    assert macs == 8 * 3 * 9 * 16 * 16 + 8 * 4
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, torch.zeros(8))  # eval: stats never moved


def test_count_macs_rejects_bad_resolution():
    with pytest.raises(ValueError):
        count_macs(nn.Linear(2, 2), resolution=0)


@pytest.mark.parametrize(("name", "gmacs"), [("resnet18", 1.82), ("efficientnet_b0", 0.39)])
def test_count_macs_matches_published_numbers(name, gmacs):
    # torchvision's model cards give these as "GFLOPS", counting multiply-adds.
    model = build_backbone(name, num_classes=1000)
    assert count_macs(model, resolution=224) / 1e9 == pytest.approx(gmacs, rel=0.05)
