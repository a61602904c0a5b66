"""The sparse pruner: exact scheduled sparsity, regrowth only where the schedule allows, optimizer state,
finalize, hook forms, checkpoints, and identical masks on two gloo ranks."""

import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srcompress.compress.patterns import detect_pattern
from srcompress.compress.schedules import Cyclical, Gradual
from srcompress.compress.sparse_training import CyclicalPruner, GradualPruner, OneShotPruner, SparsePruner
from srcompress.errors import SrcompressError
from srcompress.models import LeNet5


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


EXAMPLE = (torch.zeros(1, 1, 8, 8),)
PRUNED = ("conv2.weight", "fc1.weight")  # first conv and last layer stay dense


def data(seed=0, n=256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    return x, (x[:, 0, :4, :4].sum((1, 2)) > 0).long() + 2 * (x[:, 0, 4:, 4:].sum((1, 2)) > 0).long()


def train(model, pruner, optimizer, steps, seed=0, on_step=None):
    x, y = data(seed)
    for step in range(steps):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        if on_step is not None:
            on_step(step + 1)


def fresh(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def pruned_count(pruner):
    return {name: int((~mask).sum()) for name, mask in pruner.masks.items()}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ["gmp", "cyclical"])
def test_masks_hold_exactly_the_scheduled_sparsity_every_step(scope, kind):
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = Gradual(0.9, 60, 3) if kind == "gmp" else Cyclical(0.9, 60, 3, cycles=3, prune_fraction=0.75)
    pruner = SparsePruner(model, schedule, scope=scope, optimizer=optimizer, example_inputs=EXAMPLE)
    sizes = {name: pruner.params[name].numel() for name in PRUNED}
    assert set(pruner.masks) == set(PRUNED)

    def check(step):
        s = schedule.sparsity(step)
        counts = pruned_count(pruner)
        if scope == "layer":
            assert counts == {name: round(s * n) for name, n in sizes.items()}, step
        else:
            assert sum(counts.values()) == round(s * sum(sizes.values())), step
        for name, mask in pruner.masks.items():
            assert not pruner.params[name][~mask].any(), (step, name)  # pruned weights are exact zeros

    check(0)
    train(model, pruner, optimizer, 60, on_step=check)


@pytest.mark.parametrize("pattern,unit", [("block:8x8", 64), ("2:4", 2)])
def test_structured_patterns_follow_the_schedule(pattern, unit):
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = 0.5 if pattern == "2:4" else 0.75
    pruner = GradualPruner(model, target, 40, interval=4, pattern=pattern, optimizer=optimizer, example_inputs=EXAMPLE)
    units = {name: pruner.params[name].numel() // (64 if unit == 64 else 4) for name in PRUNED}

    def check(step):
        fraction = pruner.schedule.sparsity(step) / target
        for name, count in pruned_count(pruner).items():
            expected = round(pruner.schedule.sparsity(step) * units[name]) if unit == 64 else round(fraction * units[name])
            assert count == expected * unit, (step, name)

    train(model, pruner, optimizer, 40, on_step=check)
    pruner.finalize()
    for name in PRUNED:
        layer = next(p.layer for p in pruner.plans if p.layer.name == name)
        if unit == 2:
            assert detect_pattern(layer) == "2:4"
        else:
            rows, cols = layer.matrix_shape()
            zero = layer.to_matrix(layer.param == 0).reshape(rows // 8, 8, cols // 8, 8).sum(dim=(1, 3))
            assert set(zero.flatten().tolist()) == {0, 64}  # whole 8x8 blocks are zero or kept


def test_regrowth_happens_only_at_restarts_and_survives():
    """The no-op bug (algorithms.md 3.7.1) would leave every pruned weight at zero after a restart."""
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = CyclicalPruner(model, 0.9, 90, cycles=3, prune_fraction=1.0, interval=3, optimizer=optimizer, example_inputs=EXAMPLE)
    schedule = pruner.schedule
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    pruned_before_restart = {}
    revived_at = []

    def check(step):
        nonlocal previous
        revived = sum(int((~previous[n] & m).sum()) for n, m in pruner.masks.items())
        if revived:
            revived_at.append(step)
            assert schedule.sparsity(step) < schedule.sparsity(step - 1), step  # only where sparsity drops
        if not schedule.is_update(step):
            assert all(torch.equal(previous[n], m) for n, m in pruner.masks.items()), step
        if schedule.is_restart(step):
            assert all(m.all() for m in pruner.masks.values())  # masks lifted: the first update is dense
            pruned_before_restart[step] = {n: ~previous[n] for n in previous}
        if step - 1 in pruned_before_restart:  # one optimizer step after a restart
            for name, was_pruned in pruned_before_restart[step - 1].items():
                param = pruner.params[name]
                reached = was_pruned & (param.grad != 0)  # gradients reached weights pruned before the restart
                assert reached.sum() > 0.1 * was_pruned.sum()
                assert (param[reached] != 0).all()  # and moved them off zero
        previous = {n: m.clone() for n, m in pruner.masks.items()}

    train(model, pruner, optimizer, 90, on_step=check)
    assert revived_at == [30, 60]
    summary = pruner.finalize()
    assert summary["reached"] == pytest.approx(0.9, abs=1e-3)
    assert summary["recovered_fraction"] > 0.05  # weights pruned in an earlier cycle are in the final mask


def test_gmp_and_oneshot_never_revive():
    for build in (lambda m, o: GradualPruner(m, 0.9, 60, interval=2, optimizer=o, example_inputs=EXAMPLE),
                  lambda m, o: OneShotPruner(m, 0.9, 60, at=20, optimizer=o, example_inputs=EXAMPLE)):
        model = fresh()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = build(model, optimizer)
        train(model, pruner, optimizer, 60)
        summary = pruner.finalize()
        assert summary["recovered_fraction"] == 0.0 and summary["revived_total"] == 0


def test_first_moments_of_pruned_weights_are_zeroed_second_moments_kept():
    model = fresh()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = OneShotPruner(model, 0.8, 20, at=5, optimizer=optimizer, example_inputs=EXAMPLE)
    train(model, pruner, optimizer, 5)
    for name, mask in pruner.masks.items():
        state = optimizer.state[pruner.params[name]]
        assert not state["exp_avg"][~mask].any()
        assert state["exp_avg_sq"][~mask].abs().sum() > 0
    train(model, pruner, optimizer, 3)  # masked gradients keep them at zero
    for name, mask in pruner.masks.items():
        assert not optimizer.state[pruner.params[name]]["exp_avg"][~mask].any()
        assert not pruner.params[name][~mask].any()


def test_sgd_momentum_and_reset_mode():
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pruner = CyclicalPruner(model, 0.7, 40, cycles=2, prune_fraction=1.0, interval=2, optimizer=optimizer,
                            optimizer_state="reset", example_inputs=EXAMPLE)
    seen = []

    def check(step):
        for name, mask in pruner.masks.items():
            state = optimizer.state.get(pruner.params[name], {})
            if pruner.schedule.is_restart(step):
                seen.append(step)
                assert state == {}
            elif "momentum_buffer" in state:
                assert not state["momentum_buffer"][~mask].any()

    train(model, pruner, optimizer, 40, on_step=check)
    assert seen == [20, 20]


def test_finalize_bakes_target_and_removes_hooks():
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = GradualPruner(model, 0.9, 100, optimizer=optimizer, example_inputs=EXAMPLE)
    train(model, pruner, optimizer, 10)  # stop long before the ramp ends
    summary = pruner.finalize()
    assert summary["early"] and summary["reached"] == pytest.approx(0.9, abs=1e-3)
    zeros = {name: int((pruner.params[name] == 0).sum()) for name in PRUNED}
    assert zeros == {name: round(0.9 * pruner.params[name].numel()) for name in PRUNED}
    with pytest.raises(RuntimeError):
        pruner.step()
    train(model, None, optimizer, 1)  # no hooks left: pruned weights get gradients again
    assert all((pruner.params[name] != 0).sum() > pruner.params[name].numel() // 2 for name in PRUNED)


def test_context_manager_and_attach_run_step_after_each_optimizer_step():
    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with CyclicalPruner(model, 0.8, 30, cycles=2, optimizer=optimizer, example_inputs=EXAMPLE) as pruner:
        train(model, None, optimizer, 30)
        assert pruner.step_count == 30
    assert pruner.finalized and pruner.mask_sparsity() == pytest.approx(0.8, abs=1e-3)

    model = fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = GradualPruner(model, 0.5, 10, example_inputs=EXAMPLE)
    handle = pruner.attach(optimizer)
    train(model, None, optimizer, 10)
    handle.remove()
    assert pruner.step_count == 10 and pruner.sparsity == 0.5


def test_state_dict_resume_is_exact():
    def run(split):
        model = fresh()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = CyclicalPruner(model, 0.9, 40, cycles=2, interval=2, optimizer=optimizer, example_inputs=EXAMPLE)
        x, y = data()
        for step in range(40):
            if step == split:
                saved = ({k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict(), pruner.state_dict())
                model = fresh(seed=5)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                pruner = CyclicalPruner(model, 0.9, 40, cycles=2, interval=2, optimizer=optimizer, example_inputs=EXAMPLE)
                model.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
                pruner.load_state_dict(saved[2])
            optimizer.zero_grad()
            F.cross_entropy(model(x[step % 8 * 32:][:32]), y[step % 8 * 32:][:32]).backward()
            optimizer.step()
            pruner.step()
        pruner.finalize()
        return model.state_dict()

    straight, resumed = run(split=-1), run(split=17)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_bad_requests_are_errors():
    model = fresh()
    with pytest.raises(SrcompressError, match="2:4 always gives sparsity 0.5"):
        GradualPruner(model, 0.9, 10, pattern="2:4", example_inputs=EXAMPLE)
    with pytest.raises(SrcompressError, match="no layer of the model can be pruned"):
        GradualPruner(model, 0.9, 10, exclude=("*",), example_inputs=EXAMPLE)
    with pytest.raises(SrcompressError, match="optimizer-state mode"):
        GradualPruner(model, 0.9, 10, optimizer_state="forget", example_inputs=EXAMPLE)


def test_layers_found_without_an_example_input():
    model = LeNet5().train()
    pruner = GradualPruner(model, 0.5, 10)
    assert set(pruner.masks) == {"features.3.weight", "classifier.0.weight", "classifier.2.weight"}
    assert model.training  # tracing ran in eval mode, the training mode is restored
    with pytest.raises(SrcompressError, match="could not guess an input"):
        GradualPruner(fresh(), 0.5, 10)  # 8x8 inputs cannot be guessed


# ----- two processes, gloo ------------------------------------------------------------------------
def _ddp_worker(rank, world, rendezvous, results):
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick, so no race with other processes for a free one
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = TinyNet()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = CyclicalPruner(ddp, 0.9, 48, cycles=2, interval=2, optimizer=optimizer, example_inputs=EXAMPLE)
        x, y = data(seed=10 + rank)  # each rank sees its own shard
        digests = []
        for step in range(48):
            if step == 20 and rank == 1:
                with torch.no_grad():  # make rank 1's weights drift: its own top-k would differ
                    model.fc1.weight.add_(torch.randn_like(model.fc1.weight) * 1e-3)
            batch = slice(step % 8 * 32, step % 8 * 32 + 32)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x[batch]), y[batch]).backward()
            optimizer.step()
            pruner.step()
            digests.append(hashlib.sha256(b"".join(m.numpy().tobytes() for m in pruner.masks.values())).hexdigest())
        summary = pruner.finalize()
        results.put((rank, digests, summary["reached"], summary["revived_total"]))
        del pruner, ddp  # release DDP's reducer while the process group is alive
        torch.distributed.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        torch.distributed.destroy_process_group()
    # Results are in the queue; skip interpreter teardown, where gloo's threads occasionally abort the process
    # ("terminate called without an active exception") after all the work is done.
    os._exit(0)


def test_two_gloo_ranks_hold_identical_masks(tmp_path):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2, join=True, start_method="spawn")
    got = dict((r[0], r[1:]) for r in (results.get(), results.get()))
    assert got[0][0] == got[1][0]  # every step's masks, bit for bit
    assert got[0][1] == got[1][1] == pytest.approx(0.9, abs=1e-3)
    assert got[0][2] > 0 and not math.isnan(got[0][1])
