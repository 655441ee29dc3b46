"""The optimizer and the learning-rate schedule of a run, from its config (timm's optimizers and schedulers).

Every schedule is stepped per iteration (`scheduler.step_update(n)` after update n - 1), so the learning rate of
update n is the schedule's value at n. The step and multi-step schedules follow the authors' keys: `step_size`
(or `lr_drop`) / `milestones` in epochs, `gamma`, no warm-up; `warmup_steps` is a warm-up in iterations.
"""
from __future__ import annotations

from typing import Any, Mapping

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler, create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.optim import Optimizer

from dnrt.errors import DNRTError

DROP_LR_NOW = 0.1  # the authors' factor for drop_lr_now


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module) -> Optimizer:
    """timm's optimizer by name (no weight decay on biases and norms) with the config's lr, decay and momentum."""
    try:
        return create_optimizer_v2(model, opt=cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                   momentum=cfg["momentum"])
    except (ValueError, AssertionError, TypeError) as e:
        raise DNRTError(f"optimizer {cfg['optimizer']!r}: {e}") from None


def warmup_updates(cfg: Mapping[str, Any], updates_per_epoch: int) -> int:
    """The warm-up in iterations: warmup_epochs whole epochs, else warmup_steps."""
    return cfg["warmup_epochs"] * updates_per_epoch if cfg["warmup_epochs"] > 0 else cfg["warmup_steps"]


def build_scheduler(cfg: Mapping[str, Any], optimizer: Optimizer, updates_per_epoch: int) -> Scheduler:
    """The config's schedule over epochs × updates_per_epoch iterations, stepped with `step_update`."""
    if updates_per_epoch < 1:
        raise DNRTError("the schedule needs at least one update per epoch")
    kind, total = cfg["scheduler"], cfg["epochs"] * updates_per_epoch
    if kind == "cosine":
        # what create_scheduler_v2(step_on_epochs=False) builds, with the warm-up counted in iterations
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=cfg["min_lr"], warmup_t=warmup_updates(
            cfg, updates_per_epoch), warmup_lr_init=cfg["warmup_lr"], warmup_prefix=False, cycle_limit=1,
            t_in_epochs=False)
    if kind == "step":
        step_size = cfg["step_size"] or cfg["lr_drop"]
        return StepLRScheduler(optimizer, decay_t=step_size * updates_per_epoch, decay_rate=cfg["gamma"],
                               t_in_epochs=False)
    if kind == "multistep":
        # timm applies a milestone one update early (its `t + 1` convention); + 1 puts each drop on the first
        # update of the milestone epoch, where torch's MultiStepLR (stepped per epoch) puts it
        milestones = [m * updates_per_epoch + 1 for m in cfg["milestones"]]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=cfg["gamma"], t_in_epochs=False)
    scheduler, _ = create_scheduler_v2(optimizer, sched=kind, num_epochs=cfg["epochs"],
                                       warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                       min_lr=cfg["min_lr"], step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


def drop_lr_now(scheduler: Scheduler, optimizer: Optimizer, factor: float = DROP_LR_NOW) -> None:
    """The authors' `drop_lr_now` on resume: every learning rate from here on is `factor` times the schedule's
    (the training loop keeps the product of the drops in its checkpoints and applies it to the rebuilt schedule)."""
    scheduler.base_values = [v * factor for v in scheduler.base_values]
    for name in ("lr_min", "warmup_lr_init"):
        if hasattr(scheduler, name):
            setattr(scheduler, name, getattr(scheduler, name) * factor)
    if hasattr(scheduler, "warmup_steps"):
        scheduler.warmup_steps = [s * factor for s in scheduler.warmup_steps]
    for group in optimizer.param_groups:
        group[scheduler.param_group_field] *= factor
