from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.models import build_backbone
from trainables.optim import (
    apply_lr_schedule,
    build_optimizer,
    cosine_warmup_factor,
    freeze_stages,
    param_groups,
    set_train_mode,
    unfreeze_param_groups,
)


@pytest.fixture(scope="module")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:16], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 16
    x = F.interpolate(x, size=32, mode="bilinear")
    return x, torch.tensor(d.target[:16])


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
@pytest.mark.parametrize("depth", [0, 2, "all"])
def test_freezing_keeps_exactly_the_first_stages_and_their_bn_stats(backbone, depth, digits_batch):
    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=10)
    depth = len(model.stages) if depth == "all" else depth
    freeze_stages(model, depth)
    before = [_snapshot(s) for s in model.stages]
    head_before = _snapshot(model.head)
    opt = build_optimizer("sgd", param_groups(model, lr=0.1, lr_scale=0.5, freeze_depth=depth))
    set_train_mode(model, depth)
    x, y = digits_batch
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for i, stage in enumerate(model.stages):
        after = stage.state_dict()
        changed = any(
            not torch.equal(before[i][k], after[k])
            for k in after
            if not k.endswith("num_batches_tracked")
        )
        if i < depth:
            assert not changed, f"frozen stage {i} changed (weights or BN running stats)"
            assert all(not p.requires_grad for p in stage.parameters())
        else:
            assert changed, f"trainable stage {i} did not change"
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())


def test_frozen_parameters_are_not_in_the_optimizer():
    model = build_backbone("resnet18", num_classes=10)
    freeze_stages(model, 3)
    groups = param_groups(model, lr=0.1, lr_scale=0.1, freeze_depth=3)
    handed = {id(p) for g in groups for p in g["params"]}
    frozen = {id(p) for s in model.stages[:3] for p in s.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not handed & frozen
    assert handed == trainable


def test_param_group_rates_and_weight_decay():
    model = build_backbone("resnet18", num_classes=10)
    freeze_stages(model, 1)
    groups = param_groups(
        model, lr=0.2, lr_scale=0.1, weight_decay=1e-4, freeze_depth=1, layer_decay=0.5
    )
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(0.2)
    n = len(model.stages)
    for i in range(1, n):
        expected = 0.2 * 0.1 * 0.5 ** (n - 1 - i)
        assert by_name[f"stage{i}"]["lr"] == pytest.approx(expected)
        assert by_name[f"stage{i}.no_decay"]["weight_decay"] == 0.0
        assert by_name[f"stage{i}"]["weight_decay"] == 1e-4
    assert "stage0" not in by_name
    # every decayed parameter is a conv/linear weight; norms and biases are not decayed
    for g in groups:
        for p in g["params"]:
            assert (p.ndim > 1) == (g["weight_decay"] > 0)


def test_out_of_range_freeze_depth_names_the_valid_range():
    model = build_backbone("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"resnet18.*0\.\.5"):
        freeze_stages(model, 6)
    with pytest.raises(ValueError, match="lr_scale"):
        param_groups(model, lr=0.1, lr_scale=0.0)


def test_gradual_unfreezing_appends_stage_groups_at_backbone_rate():
    model = build_backbone("resnet18", num_classes=10)
    freeze_stages(model, 2)
    opt = build_optimizer("adamw", param_groups(model, lr=1e-3, lr_scale=0.1, freeze_depth=2))
    n_before = len(opt.param_groups)
    for g in unfreeze_param_groups(model, lr=1e-3, lr_scale=0.1, freeze_depth=2):
        opt.add_param_group(g)
    names = [g["name"] for g in opt.param_groups[n_before:]]
    assert names == ["stage1", "stage1.no_decay", "stage0", "stage0.no_decay"]
    assert all(g["lr"] == pytest.approx(1e-4) for g in opt.param_groups[n_before:])
    assert all(p.requires_grad for p in model.parameters())


def test_cosine_warmup_schedule():
    assert cosine_warmup_factor(0, total_steps=100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_warmup_factor(9, total_steps=100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_warmup_factor(55, total_steps=100, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_warmup_factor(100, total_steps=100, warmup_steps=10) == pytest.approx(0.0)
    model = build_backbone("resnet18", num_classes=10)
    opt = build_optimizer("sgd", param_groups(model, lr=0.1, lr_scale=0.1))
    apply_lr_schedule(opt, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.005)
