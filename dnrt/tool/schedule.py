"""The optimizer and the learning-rate schedule of a run, built from its config (timm's factories)."""
from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.optim import Optimizer


def build_optimizer(cfg: dict, model: nn.Module) -> Optimizer:
    """timm's optimizer named by cfg['optimizer'] over the model's parameters."""
    return create_optimizer_v2(model, opt=cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                               momentum=cfg["momentum"])


def build_scheduler(cfg: dict, optimizer: Optimizer, updates_per_epoch: int) -> Any:
    """timm's scheduler for cfg['epochs'] epochs, stepped every update (step_update)."""
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg["scheduler"], num_epochs=cfg["epochs"],
                                       warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                       min_lr=cfg["min_lr"], step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler
