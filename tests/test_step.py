"""The training step: no host syncs between log steps, a skipped step changes nothing, and the EMA is torch's."""
from __future__ import annotations

import copy
import sys
from collections import Counter

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tntcli.engine.step import ModelEma, TrainStep
from tntcli.models import create_model

from test_engine import TINY_ARCH, tiny_config

# Runs here finish without drawing curves.png/.svg: the plot is not what these tests are about (conftest.py).
pytestmark = pytest.mark.usefixtures("no_training_curves")

TINY = dict(TINY_ARCH, img_size=16, num_classes=10, drop_path_rate=0.0)


def batch(seed: int, poison: bool = False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 16, 16, generator=g)
    if poison:
        images[0, 0, 0, 0] = float("nan")
    return images, torch.randint(0, 10, (4,), generator=g)


def stepper(model, skip: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return TrainStep(model, model, opt, ema=ModelEma(model, 0.9), skip_non_finite=skip)


# ------------------------------------------------------------------------------------------ host syncs
SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts the Tensor methods that read a value back to the host (a device sync on a GPU), by caller.

    Calls from torch.optim are left out: on the CPU, AdamW keeps its step counters on the host and reads them
    there; on CUDA the engine uses fused AdamW, whose counters live on the device."""
    calls = Counter()
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "torch/optim" not in caller:
                calls[(_name, caller)] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_a_train_step_reads_nothing_back_to_the_host(sync_counter):
    for skip in (False, True):
        step = stepper(create_model("tnt-ti", **TINY), skip)
        step(*batch(0))                                   # first step creates the optimiser state
        sync_counter.clear()
        for seed in range(3):
            loss, finite = step(*batch(seed, poison=seed == 1))
        assert not sync_counter, dict(sync_counter)


def _engine_syncs(tmp_path, data, counter, steps: int, log_every: int) -> int:
    from tntcli.engine.train import train

    counter.clear()
    cfg = tiny_config(**{"train.epochs": 1, "train.max_steps": steps, "train.log_every": log_every,
                         "data.data": str(data), "data.batch_size": 4, "data.max_train_images": None,
                         "data.augment": False})
    train(cfg, out=tmp_path / f"run-{steps}-{log_every}")
    return sum(counter.values())


def test_the_engine_syncs_only_at_log_steps(tmp_path, image_folder, sync_counter):
    """An epoch of 6 steps reads back exactly as often as one of 2 when no log step falls in between: zero syncs
    per step. With a log step every step, more: the counter does see the engine's reads. (24 train images in
    batches of 4 give the 6 steps; 9 val images keep the evaluation, which both runs share, short.)"""
    two, six = (_engine_syncs(tmp_path, image_folder, sync_counter, n, log_every=100) for n in (2, 6))
    assert six == two
    assert _engine_syncs(tmp_path, image_folder, sync_counter, 6, log_every=1) > six


# ------------------------------------------------------------------------------------------ skip policy
def test_a_skipped_step_changes_no_weight_optimiser_state_or_ema():
    """nan_policy skip: good, bad, good gives bit for bit what good, good gives."""
    torch.manual_seed(0)
    model = create_model("tnt-ti", **TINY)
    with_bad, without = stepper(copy.deepcopy(model), True), stepper(copy.deepcopy(model), True)
    for seed, poison in ((0, False), (1, True), (2, False)):
        loss, finite = with_bad(*batch(seed, poison))
        assert bool(finite) is not poison
    for seed in (0, 2):
        without(*batch(seed))
    for a, b in zip([*with_bad.model.parameters(), *with_bad.ema.module.parameters()],
                    [*without.model.parameters(), *without.ema.module.parameters()]):
        assert torch.equal(a, b)
    for a, b in zip(with_bad.optimizer.state.values(), without.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_bad_first_step_leaves_the_fresh_optimiser_state():
    model = create_model("tnt-ti", **TINY)
    before = copy.deepcopy(model.state_dict())
    step = stepper(model, True)
    step(*batch(1, poison=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in step.optimizer.state.values())


# ------------------------------------------------------------------------------------------ EMA
def test_ema_is_torchs_averaged_model_bit_for_bit_and_loads_its_state():
    torch.manual_seed(0)
    model = create_model("tnt-ti", **TINY)
    ours, torchs = ModelEma(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(4):
        images, labels = batch(seed)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
        ours.update(model)
        torchs.update_parameters(model)
    theirs = torchs.state_dict()
    assert sorted(ours.state_dict()) == sorted(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    restored = ModelEma(create_model("tnt-ti", **TINY), 0.9)
    restored.load_state_dict(theirs)                        # a checkpoint written with AveragedModel
    assert restored.n_averaged == 4
    assert all(torch.equal(a, b) for a, b in zip(restored.module.parameters(), torchs.module.parameters()))
