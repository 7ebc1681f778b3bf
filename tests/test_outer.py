"""DiLoCo's outer step equals torch.optim.SGD on the same pseudo-gradients, bit for bit; sgd at lr 1 is averaging.

No Ray: local SGD is written out here in plain PyTorch (workers' local steps on least squares, deltas averaged).
"""

from __future__ import annotations

import pytest
import torch

from sgd_dist.core.outer import outer_update_


def local_sgd_delta(w: torch.Tensor, shards, local_steps: int = 4, lr: float = 0.05) -> torch.Tensor:
    """Each worker's local SGD from w on its shard; the mean of (w - its weights after the steps)."""
    deltas = []
    for X, y in shards:
        v = w.clone()
        for _ in range(local_steps):
            v -= lr * (2 / len(y)) * ((X @ v - y) @ X)
        deltas.append(w - v)
    return torch.stack(deltas).mean(dim=0)


def shards(dtype, workers: int = 3, d: int = 12):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, generator=g, dtype=dtype)
    out = []
    for _ in range(workers):
        X = torch.randn(32, d, generator=g, dtype=dtype)
        out.append((X, X @ a + 0.1 * torch.randn(32, generator=g, dtype=dtype)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer, lr, momentum", [("nesterov", 0.7, 0.9), ("nesterov", 1.0, 0.5), ("sgd", 0.7, 0.0)])
def test_outer_step_equals_torch_sgd_bit_for_bit(optimizer, lr, momentum, dtype):
    data = shards(dtype)
    w = torch.zeros(12, dtype=dtype)
    param = torch.nn.Parameter(torch.zeros(12, dtype=dtype))
    reference = torch.optim.SGD([param], lr=lr, momentum=momentum, nesterov=optimizer == "nesterov")
    state: dict = {}
    for round_ in range(8):
        outer_update_(w, local_sgd_delta(w, data), state, optimizer=optimizer, lr=lr, momentum=momentum)
        param.grad = local_sgd_delta(param.detach(), data)
        reference.step()
        assert torch.equal(w, param.detach()), round_
    if optimizer == "nesterov":
        assert torch.equal(state["momentum_buffer"], reference.state[param]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outer_sgd_at_lr_1_is_plain_averaging(dtype):
    data = shards(dtype)
    w, plain = torch.zeros(12, dtype=dtype), torch.zeros(12, dtype=dtype)
    state: dict = {}
    for round_ in range(8):
        outer_update_(w, local_sgd_delta(w, data), state)  # the defaults: sgd, lr 1
        plain.sub_(local_sgd_delta(plain, data))
        assert torch.equal(w, plain), round_
    assert state == {}


def test_nesterov_differs_from_averaging_and_its_state_restores_exactly():
    data = shards(torch.float64)
    w, state = torch.zeros(12, dtype=torch.float64), {}
    for _ in range(3):
        outer_update_(w, local_sgd_delta(w, data), state, optimizer="nesterov", lr=0.7, momentum=0.9)
    saved_w, saved = w.clone(), {k: v.clone() for k, v in state.items()}
    for _ in range(3):
        outer_update_(w, local_sgd_delta(w, data), state, optimizer="nesterov", lr=0.7, momentum=0.9)
    for _ in range(3):
        outer_update_(saved_w, local_sgd_delta(saved_w, data), saved, optimizer="nesterov", lr=0.7, momentum=0.9)
    assert torch.equal(w, saved_w)
    averaged = torch.zeros(12, dtype=torch.float64)
    for _ in range(6):
        averaged.sub_(local_sgd_delta(averaged, data))
    assert not torch.allclose(w, averaged)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"optimizer": "adam"}, r"train\.outer\.optimizer must be one of sgd, nesterov"),
        ({"optimizer": "sgd", "lr": 0.0}, r"train\.outer\.lr must be > 0"),
        ({"optimizer": "nesterov", "lr": 0.7, "momentum": 0.0}, r"train\.outer\.momentum must be in \(0, 1\)"),
        ({"optimizer": "nesterov", "lr": 0.7, "momentum": 1.0}, r"train\.outer\.momentum must be in \(0, 1\)"),
    ],
)
def test_bad_outer_settings_name_the_field(settings, field):
    w = torch.zeros(3)
    with pytest.raises(ValueError, match=field):
        outer_update_(w, torch.ones(3), {}, **settings)
    assert torch.equal(w, torch.zeros(3))
