"""The worker and the server as plain objects: the pieces both backends share. No Ray."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.backends.base import server_args, worker_args
from sgd_dist.core.data import generate
from sgd_dist.core.objectives import loss_and_grad
from sgd_dist.core.optim import learning_rate, sgd_update_
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import GradientResult, ShardWorker


def test_worker_holds_its_rows_and_takes_the_sampled_batch():
    config = make_config()
    args = worker_args(config)[1]
    worker = ShardWorker(**args)
    X, y = generate(config.data)
    assert torch.equal(worker.X, X[256:512]) and torch.equal(worker.y, y[256:512])
    w = torch.tensor([0.5, -0.5, 1.0, 0.0])
    result = worker.gradient(w, step=3)
    idx = worker.sampler.indices(3)
    loss, grad = loss_and_grad("linear", w, worker.X[idx], worker.y[idx])
    assert result.count == 16 and result.loss == loss and torch.equal(result.grad, grad)
    assert worker.info()["rows"] == [256, 512]


def test_a_blocks_worker_takes_a_contiguous_batch_in_place():
    config = make_config("train.sampling=blocks", "train.batch_size=24")
    worker = ShardWorker(**worker_args(config)[1])
    w = torch.tensor([0.5, -0.5, 1.0, 0.0])
    for step in [0, 7, 13]:  # 10 batches of 24 per epoch in the 256-row shard
        lo = worker.sampler.start(step)
        X, y = worker.batch(step)
        assert X.data_ptr() == worker.X[lo].data_ptr() and X.shape[0] == 24  # a view, no copy
        loss, grad = loss_and_grad("linear", w, worker.X[lo : lo + 24], worker.y[lo : lo + 24])
        result = worker.gradient(w, step)
        assert result.loss == loss and torch.equal(result.grad, grad)


@pytest.mark.parametrize("sampling", ["shuffle", "blocks"])
@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_local_steps_equal_autograd_sgd_on_the_sampled_batches(sampling, kind):
    """Local SGD's inner steps on the written-out gradient, against the same steps by autograd, bit for bit."""
    config = make_config(f"data.kind={kind}", f"train.sampling={sampling}", "train.mode=local_sgd",
                         "train.local_steps=4", "optim.weight_decay=0.05", "optim.schedule=cosine")
    args = worker_args(config)[0]
    worker = ShardWorker(**args)
    w0 = torch.tensor([0.5, -0.5, 1.0, 0.1])
    delta, loss, rows = worker.local_steps(w0, 8, 4)
    w, losses = w0.clone(), []
    for t in range(8, 12):
        idx = worker.sampler.indices(t)
        batch_loss, grad = loss_and_grad(kind, w, worker.X[idx], worker.y[idx])
        lr = learning_rate(config.optim, t, args["total_steps"], args["global_batch_size"])
        sgd_update_(w, grad, {}, lr=lr, weight_decay=0.05)
        losses.append(batch_loss)
    assert rows == 64 and loss == sum(x * 16 for x in losses) / 64 and torch.equal(delta, w0 - w)


def test_full_batch_worker_uses_the_whole_shard():
    worker = ShardWorker(**worker_args(make_config("train.batch_size=full"))[0])
    assert worker.gradient(torch.zeros(4), 0).count == 256


def test_server_averages_by_rows_and_updates_in_place():
    config = make_config("optim.lr=0.5")
    server = ParameterServer(**server_args(config))
    w0, row0 = server.start()
    assert torch.equal(w0, torch.zeros(4)) and row0["step"] == 0 and row0["loss"] is None
    a = GradientResult(torch.tensor([1.0, 0, 0, 0]), 2.0, 30, 0, 0)
    b = GradientResult(torch.tensor([0.0, 1, 0, 0]), 4.0, 10, 1, 0)
    row = server.update([a, b])
    torch.testing.assert_close(server.weights, torch.tensor([-0.375, -0.125, 0, 0]))  # 0.5 * (0.75, 0.25)
    assert row["loss"] == 2.5 and row["samples_seen"] == 40 and row["step"] == 1 and row["lr"] == 0.5
    w0[0] = 99.0  # start's copy is not the server's weights
    assert server.weights[0] == -0.375


def test_server_state_is_a_plain_mapping_that_restores_exactly():
    config = make_config("optim.momentum=0.9", "optim.schedule=cosine")
    grads = [GradientResult(torch.randn(4, generator=torch.Generator().manual_seed(s)), 1.0, 16, 0, s)
             for s in range(6)]
    one = ParameterServer(**server_args(config))
    for g in grads[:3]:
        one.update([g])
    state = one.state_dict()
    assert set(state) == {"weights", "optimizer", "step", "samples_seen"}
    assert all(isinstance(v, (torch.Tensor, int, dict)) for v in state.values())
    two = ParameterServer(**server_args(config))
    two.load_state_dict(state)
    for g in grads[3:]:
        r_one, r_two = one.update([g]), two.update([g])
        assert torch.equal(one.weights, two.weights) and r_one["lr"] == r_two["lr"] and r_one["step"] == r_two["step"]
