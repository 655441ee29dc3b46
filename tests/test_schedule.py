"""The optimizer and the schedules: every iteration's learning rate against its formula, drop_lr_now, start_epoch."""
import math

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from dnrt.tool.config import resolve
from dnrt.tool.schedule import build_optimizer, build_scheduler, drop_lr_now

U = 7  # updates per epoch


def rates(cfg, scheduler=None, optimizer=None, start=0):
    """The learning rate of every update from `start`, stepped as the training loop steps it."""
    if scheduler is None:
        optimizer = build_optimizer(cfg, torch.nn.Linear(3, 2))
        scheduler = build_scheduler(cfg, optimizer, U)
    out = []
    for n in range(start, cfg["epochs"] * U):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(n + 1)
    return out


def cosine(cfg, n, warmup):
    lr, floor, start = cfg["lr"], cfg["min_lr"], cfg["warmup_lr"]
    if n < warmup:
        return start + n * (lr - start) / warmup
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * n / (cfg["epochs"] * U)))


def test_cosine_with_warmup_epochs_is_the_formula_and_timms_factory():
    cfg = resolve({"lr": 0.1, "epochs": 5, "warmup_epochs": 2, "warmup_lr": 1e-3, "min_lr": 1e-4})
    got = rates(cfg)
    assert got == pytest.approx([cosine(cfg, n, 2 * U) for n in range(5 * U)], rel=1e-12)
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    factory, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=5, warmup_epochs=2, warmup_lr=1e-3,
                                     min_lr=1e-4, step_on_epochs=False, updates_per_epoch=U)
    assert got == pytest.approx(rates(cfg, factory, optimizer), rel=1e-12)


def test_cosine_with_warmup_steps_counts_iterations():
    cfg = resolve({"lr": 0.1, "epochs": 3, "warmup_epochs": 0, "warmup_steps": 4, "warmup_lr": 0.0, "min_lr": 0.0})
    got = rates(cfg)
    assert got[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, cosine(cfg, 4, 4)])
    assert got == pytest.approx([cosine(cfg, n, 4) for n in range(3 * U)], rel=1e-12)


@pytest.mark.parametrize("settings", [{"step_size": 2}, {"lr_drop": 2}])
def test_step_drops_by_gamma_every_step_size_epochs(settings):
    cfg = resolve({"lr": 0.1, "epochs": 7, "scheduler": "step", "gamma": 0.5, "warmup_epochs": 20, **settings})
    expected = [0.1 * 0.5 ** ((n // U) // 2) for n in range(7 * U)]  # no warm-up, as in the authors' tool
    assert rates(cfg) == pytest.approx(expected, rel=1e-12)


def test_multistep_drops_at_the_first_update_of_each_milestone_epoch():
    cfg = resolve({"lr": 0.1, "epochs": 6, "scheduler": "multistep", "milestones": [2, 5], "gamma": 0.1})
    expected = [0.1 * 0.1 ** sum(m <= n // U for m in (2, 5)) for n in range(6 * U)]
    assert rates(cfg) == pytest.approx(expected, rel=1e-12)
    torch_rates = []  # torch's MultiStepLR stepped per epoch gives the same epochs
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 5], 0.1)
    for _ in range(6):
        torch_rates += [optimizer.param_groups[0]["lr"]] * U
        optimizer.step()
        reference.step()
    assert rates(cfg) == pytest.approx(torch_rates, rel=1e-12)


@pytest.mark.parametrize("settings", [{"scheduler": "step", "step_size": 2},
                                      {"scheduler": "cosine", "warmup_epochs": 3, "min_lr": 1e-3}])
def test_drop_lr_now_scales_every_later_rate_by_a_tenth(settings):
    cfg = resolve({"lr": 0.1, "epochs": 6, **settings})
    full = rates(cfg)
    optimizer = build_optimizer(cfg, torch.nn.Linear(3, 2))
    scheduler = build_scheduler(cfg, optimizer, U)
    resume_at = 2 * U  # a resume after 2 epochs: the scheduler's and optimizer's saved states are loaded
    for n in range(resume_at):
        scheduler.step_update(n + 1)
    saved = scheduler.state_dict()
    optimizer2 = build_optimizer(cfg, torch.nn.Linear(3, 2))  # in train.py's order: build, then load
    scheduler2 = build_scheduler(cfg, optimizer2, U)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(saved)
    drop_lr_now(scheduler2, optimizer2)
    assert rates(cfg, scheduler2, optimizer2, start=resume_at) == pytest.approx(
        [0.1 * r for r in full[resume_at:]], rel=1e-12)
    assert scheduler2.state_dict()["base_values"] == pytest.approx([0.01, 0.01])  # a later resume keeps the drop


def test_optimizer_takes_the_configs_settings():
    cfg = resolve({"optimizer": "sgd", "lr": 0.3, "momentum": 0.7, "weight_decay": 0.01})
    optimizer = build_optimizer(cfg, torch.nn.Linear(3, 2))
    assert isinstance(optimizer, torch.optim.SGD)
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, 0.01] and {g["momentum"] for g in optimizer.param_groups} == {0.7}


def test_drop_lr_now_on_a_resume_of_the_tool_drops_once(tmp_path):
    """The drop happens where the flag first appears; the same command again keeps 0.1× (not 0.01×), and so
    does a later resume without the flag, as the checkpoints record it."""
    import json

    from dnrt.tool.cli import main_py
    from tiny_config import TINY

    config = tmp_path / "tiny.py"
    config.write_text(TINY.replace("epochs = 2", "epochs = 2\nscheduler = 'step'\nstep_size = 5"))
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "full")]) == 0
    dropped = ["-c", str(config), "--output_dir", str(tmp_path / "dropped"), "--drop_lr_now"]
    assert main_py(dropped + ["-r", str(tmp_path / "full" / "checkpoint_0000.pth")]) == 0
    assert main_py(dropped + ["--epochs", "3"]) == 0  # the same flags continue the finished run to 3 epochs
    assert main_py(dropped[:-1] + ["--epochs", "4"]) == 0  # without the flag, to 4: the drop stays
    full, dropped = ([json.loads(line) for line in (tmp_path / run / "log.txt").read_text().splitlines()]
                     for run in ("full", "dropped"))
    assert [row["epoch"] for row in dropped] == [1, 2, 3]
    assert [row["lr"] for row in full] == pytest.approx([1e-3] * 2)  # step_size 5: constant over these epochs
    assert [row["lr"] for row in dropped] == pytest.approx([1e-4] * 3)
