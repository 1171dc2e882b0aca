"""Optimizer groups, the fused AdamW kernel and the learning-rate schedule, against
closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pali3_train.config import TrainConfig
from pali3_train.engine.optim import (
    freeze,
    lr_factor,
    make_optimizer,
    param_groups,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_schedules_follow_their_formulas():
    cosine = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")
    assert [lr_factor(s, cosine) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.5)
    assert lr_factor(85, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(110, cosine) == pytest.approx(0.0, abs=1e-12)
    inv = TrainConfig(steps=1000, warmup_steps=16, lr_schedule="inverse_sqrt")
    assert lr_factor(63, inv) == pytest.approx(0.5)
    const = TrainConfig(steps=10, warmup_steps=0, lr_schedule="constant")
    assert {lr_factor(s, const) for s in range(10)} == {1.0}


def test_matrices_decay_vectors_do_not_and_frozen_parameters_are_left_out():
    net = Net()
    freeze(net, ("tower.0",))
    groups = param_groups(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert decayed == ["head.weight"] and groups[0]["weight_decay"] == 0.1
    assert plain == ["head.bias", "tower.1.bias", "tower.1.weight"]
    assert groups[1]["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in net.tower[0].parameters())


def test_freezing_everything_or_a_missing_module_is_refused():
    net = Net()
    with pytest.raises(ValueError, match="stage.freeze: Net has no 'towr'"):
        freeze(net, ("towr",))
    freeze(net, ("tower", "head"))
    with pytest.raises(ValueError, match="no trainable parameter"):
        make_optimizer(net, TrainConfig())


def test_adamw_is_fused_and_steps_like_the_plain_loop():
    """The fused kernel against torch's per-parameter loop, the independent reference."""
    torch.manual_seed(0)
    fused_net, loop_net = Net(), Net()
    loop_net.load_state_dict(fused_net.state_dict())
    cfg = TrainConfig(weight_decay=0.1)
    fused = make_optimizer(fused_net, cfg)
    loop = torch.optim.AdamW(param_groups(loop_net, 0.1), lr=cfg.lr, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(5):
        x = torch.randn(3, 4)
        for net, optimizer in ((fused_net, fused), (loop_net, loop)):
            optimizer.zero_grad()
            net.head(net.tower(x)).square().sum().backward()
            optimizer.step()
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_parameter_partitioned_at_construction_decays_by_its_full_shape():
    """ZeRO-3's zero.Init leaves a parameter an empty 1-d tensor and its shape in ds_shape."""
    net = Net()
    for name, shape in (("head.weight", (2, 4)), ("head.bias", (2,))):
        param = net.get_parameter(name)
        param.data = torch.empty(0)
        param.ds_shape = torch.Size(shape)
    groups = param_groups(net, 0.1)
    assert any(p is net.head.weight for p in groups[0]["params"])
    assert any(p is net.head.bias for p in groups[1]["params"])
