"""The update rule equals torch.optim.SGD; the schedules equal torch's schedulers. No Ray."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.config import OptimConfig
from sgd_dist.core.optim import base_lr, learning_rate, sgd_update_


@pytest.mark.parametrize(
    "momentum, nesterov, wd",
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.5, True, 0.01), (0.0, False, 0.1)],
)
def test_update_equals_torch_sgd(momentum, nesterov, wd):
    g = torch.Generator().manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(6, generator=g))
    w = w_ref.detach().clone()
    opt = torch.optim.SGD([w_ref], lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    state: dict = {}
    for _ in range(6):
        grad = torch.randn(6, generator=g)
        w_ref.grad = grad.clone()
        opt.step()
        sgd_update_(w, grad, state, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        torch.testing.assert_close(w, w_ref.detach(), rtol=1e-6, atol=1e-7)


def test_seed_update_is_a_sub_lr_grad():
    w = torch.tensor([-1.0, 1.0])
    sgd_update_(w, torch.tensor([2.0, -4.0]), {}, lr=0.1)
    torch.testing.assert_close(w, torch.tensor([-1.2, 1.4]))


def torch_lrs(make_scheduler, steps, lr=0.4):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def ours(steps, *overrides):
    cfg = make_config("optim.lr=0.4", f"train.steps={steps}", *overrides).optim
    return [learning_rate(cfg, t, steps, 256) for t in range(steps)]


def test_constant():
    assert ours(10) == [0.4] * 10


def test_step_schedule_equals_steplr():
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 30)
    assert ours(30, "optim.schedule=step", "optim.step_size=7", "optim.gamma=0.5") == pytest.approx(ref, rel=1e-12)


def test_cosine_equals_cosine_annealing():
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=0.01), 50)
    assert ours(50, "optim.schedule=cosine", "optim.min_lr=0.01") == pytest.approx(ref, rel=1e-9)


def test_warmup_then_cosine_equals_linear_then_cosine():
    def sched(o):
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 5, end_factor=1.0, total_iters=4)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=35)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[5])

    ref = torch_lrs(sched, 40)
    assert ours(40, "optim.schedule=cosine", "optim.warmup_steps=5") == pytest.approx(ref, rel=1e-9)


def test_linear_scaling_rule():
    cfg = make_config("optim.lr=0.1", "optim.lr_scaling=linear", "optim.base_batch_size=64").optim
    assert base_lr(cfg, 256) == pytest.approx(0.4)
    assert learning_rate(cfg, 3, 10, 256) == pytest.approx(0.4)
    assert base_lr(make_config("optim.lr=0.1").optim, 256) == 0.1


def test_min_lr_is_reached_one_update_after_the_last_as_its_description_says():
    # torch's CosineAnnealingLR (T_max = the updates after warm-up): the last update still uses more than
    # min_lr. `sgd-dist config --describe` prints the field's description, so it must say the same.
    cfg = make_config("optim.lr=0.4", "optim.schedule=cosine", "optim.min_lr=0.01", "train.steps=50").optim
    assert learning_rate(cfg, 49, 50, 256) > 0.01
    assert learning_rate(cfg, 50, 50, 256) == pytest.approx(0.01, rel=1e-12)
    description = OptimConfig.model_fields["min_lr"].description
    assert "one update after the last" in description and "reached at the last step" not in description
