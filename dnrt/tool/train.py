"""Training and evaluation, written like torchvision's references/classification/train.py: top to bottom."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dnrt.errors import DNRTError
from dnrt.tool import distributed as D
from dnrt.tool.checkpoint import load_checkpoint, save_checkpoint
from dnrt.tool.config import ignored, jsonable
from dnrt.tool.data import build_dataset, dataset_info
from dnrt.tool.models import build_arr, create_model
from dnrt.tool.schedule import build_optimizer, build_scheduler, drop_lr_now

LOG_TEST_KEYS = ("test_loss", "test_acc1", "test_acc5")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; the loop reseeds every epoch so a resumed run repeats the uninterrupted one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: dict, epoch: int) -> int:
    return cfg["seed"] + 100_003 * (epoch + 1) + D.get_rank()


def mixed_precision(cfg: dict,
                    device: torch.device) -> tuple[Callable[[], AbstractContextManager], torch.amp.GradScaler]:
    """Autocast context and grad scaler: float16 + scaling on CUDA for amp=True, bfloat16 anywhere for amp='bf16'."""
    amp = cfg["amp"]
    if amp not in (True, False, "bf16"):
        raise DNRTError(f"amp must be True, False or 'bf16', got {amp!r}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    enabled = amp == "bf16" or (amp is True and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)
    return (lambda: torch.autocast(device.type, dtype=dtype, enabled=enabled)), scaler


def model_args(cfg: dict) -> dict[str, int]:
    """num_classes, in_chans, img_size: derived from the dataset, overridden by model_kwargs entries."""
    info = dataset_info(cfg)
    return {k: cfg["model_kwargs"].get(k, v) for k, v in info.items()}


def build_model(cfg: dict, args: dict[str, int], device: torch.device) -> tuple[nn.Module, Any]:
    """The model with `act` swapped in, and ARR on it when criterion == 'arr', both on `device`."""
    weights = {} if cfg["resume"] else {"pretrained": cfg["pretrained"], "pretrained_file": cfg["pretrained_file"]}
    model = create_model(cfg["model"], act=cfg["act"], model_lib=cfg["model_lib"], model_kwargs=cfg["model_kwargs"],
                         **weights, **args)
    arr = build_arr(model, cfg, args["num_classes"])
    model.to(device)
    if arr is not None:
        arr.to(device)
    return model, arr


def test_loader(cfg: dict, dataset: Dataset) -> DataLoader:
    """This process's share of the test set, without the padding a DistributedSampler would add."""
    shard = Subset(dataset, range(D.get_rank(), len(dataset), D.get_world_size()))
    return DataLoader(shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"],
                      pin_memory=cfg["pin_memory"] and torch.cuda.is_available())


def train_loader(cfg: dict, dataset: Dataset) -> tuple[DataLoader, DistributedSampler]:
    """A DistributedSampler even for one process: shuffling then depends only on seed and epoch."""
    sampler = DistributedSampler(dataset, num_replicas=D.get_world_size(), rank=D.get_rank(), shuffle=True,
                                 seed=cfg["seed"])
    drop_last = len(sampler) > cfg["batch_size"] if cfg["drop_last"] is None else cfg["drop_last"]
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=cfg["pin_memory"] and torch.cuda.is_available(), drop_last=drop_last,
                        persistent_workers=cfg["num_workers"] > 0)
    return loader, sampler


def train_one_epoch(model: nn.Module, arr: Any, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, autocast: Callable, loader: DataLoader, device: torch.device,
                    epoch: int, cfg: dict) -> dict[str, float]:
    """One pass over the training set; returns the mean total, cross-entropy and ARR losses over all processes."""
    model.train()
    if arr is not None:
        arr.train()
    sums = np.zeros(4)  # total loss, ce, arr, samples
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not D.is_main_process() or not sys.stderr.isatty(),
               dynamic_ncols=True, leave=False)
    for i, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
            ce = criterion(logits, targets)
            reg = arr.loss(targets) if arr is not None else torch.zeros((), device=device)
            loss = ce + reg
        if not math.isfinite(loss.item()):
            raise DNRTError(f"loss is {loss.item()} at epoch {epoch}, iteration {i}; lower lr or check the data")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["clip_max_norm"]:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_max_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(epoch * len(loader) + i + 1)

        n = images.shape[0]
        sums += (loss.item() * n, ce.item() * n, reg.item() * n, n)
        if (i + 1) % cfg["print_freq"] == 0:
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if bar.disable and D.is_main_process():
                print(f"epoch {epoch} [{i + 1}/{len(loader)}] loss {loss.item():.4f} lr {lr:.2e}", flush=True)
    total, ce, reg, n = D.reduce_sum(sums.tolist(), device)
    return {"train_loss": total / n, "train_ce": ce / n, "train_arr": reg / n}


@torch.no_grad()
def evaluate(model: nn.Module, arr: Any, loader: DataLoader, device: torch.device, autocast: Callable,
             num_classes: int) -> dict[str, Any]:
    """Top-1/top-5, loss, macro precision/recall/F1 and per-class accuracy over the whole test set (all processes)."""
    model.eval()
    if arr is not None:
        arr.eval()  # the memory is read, never written
    preds, targets_all, top5, losses, arr_sum = [], [], [], [], 0.0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
            if arr is not None:
                arr_sum += arr.loss(targets).item() * images.shape[0]
        logits = logits.float()
        losses.append(nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
        k = min(5, logits.shape[1])
        top5.append((logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).cpu())
        preds.append(logits.argmax(dim=1).cpu())
        targets_all.append(targets.cpu())
    local = [torch.cat(t).numpy() if t else np.zeros(0) for t in (preds, targets_all, top5, losses)]
    gathered = D.all_gather_objects(local + [arr_sum])
    pred, true, in_top5, loss = (np.concatenate([g[j] for g in gathered]) for j in range(4))
    return classification_metrics(pred.astype(int), true.astype(int), in_top5, loss, num_classes,
                                  arr_loss=sum(g[4] for g in gathered) / len(true) if arr is not None else None)


def classification_metrics(pred: np.ndarray, true: np.ndarray, in_top5: np.ndarray, loss: np.ndarray,
                           num_classes: int, arr_loss: float | None = None) -> dict[str, Any]:
    """The evaluation figures from per-sample predictions (sklearn for precision/recall/F1)."""
    precision, recall, f1, _ = precision_recall_fscore_support(true, pred, average="macro", zero_division=0)
    matrix = confusion_matrix(true, pred, labels=list(range(num_classes)))
    counts = matrix.sum(axis=1)
    per_class = {str(k): 100.0 * matrix[k, k] / counts[k] for k in range(num_classes) if counts[k]}
    metrics = {"acc1": 100.0 * float(np.mean(pred == true)), "acc5": 100.0 * float(np.mean(in_top5)),
               "loss": float(np.mean(loss)), "precision": 100.0 * precision, "recall": 100.0 * recall,
               "f1": 100.0 * f1, "num_samples": len(true), "per_class_acc1": per_class}
    if arr_loss is not None:
        metrics["arr_loss"] = arr_loss
    return metrics


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def trim_log(path: Path, start_epoch: int) -> None:
    """Keep the log lines of epochs before `start_epoch`: a fresh run starts a fresh log, a resumed one continues it."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["epoch"] < start_epoch]
        path.write_text("".join(line + "\n" for line in kept))


def checkpoint_state(model: nn.Module, arr: Any, optimizer, scheduler, scaler, epoch: int, best_acc1: float,
                     cfg: dict, args: dict) -> dict[str, Any]:
    """Everything a resume needs, as plain types and tensors (loadable with weights_only=True)."""
    return {"model": model.state_dict(), "arr": arr.state_dict() if arr is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_acc1": best_acc1, "config": jsonable(cfg), "model_args": dict(args)}


def load_weights(state: dict, model: nn.Module, arr: Any, path: str) -> None:
    """Model weights and, with ARR on, its memories from a checkpoint."""
    try:
        model.load_state_dict(state["model"])
        if arr is not None:
            if state.get("arr") is None:
                raise DNRTError(f"checkpoint {path} holds no ARR memory; set criterion='ce' to use it")
            arr.load_state_dict(state["arr"])
    except RuntimeError as e:
        raise DNRTError(f"checkpoint {path} does not fit this model/config: {str(e).splitlines()[0]}") from None


def train(cfg: dict) -> dict[str, Any]:
    """Train for cfg['epochs'] epochs (resuming from cfg['resume']), writing the run directory; returns final
    metrics."""
    device = D.select_device(cfg["device"])
    D.refuse_no_dist(cfg["no_dist"])
    D.init_distributed(device)
    note = ignored(cfg, D.is_distributed(), device.type)
    if note:
        print_main(note)
    try:
        return _train(cfg, device)
    finally:
        D.cleanup()


def _train(cfg: dict, device: torch.device) -> dict[str, Any]:
    seed_everything(cfg["seed"])
    args = model_args(cfg)
    train_set, test_set = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    loader, sampler = train_loader(cfg, train_set)
    val_loader = test_loader(cfg, test_set)
    if len(loader) == 0:
        raise DNRTError(f"no training batch: {cfg['dataset']} has {len(sampler)} training images per process, "
                        f"fewer than batch_size={cfg['batch_size']} with drop_last=True" if len(sampler)
                        else f"the training set of {cfg['dataset']} is empty")
    print_main(f"data: {cfg['dataset']} from {cfg['data_root']}: {len(train_set)} training, "
               f"{len(test_set)} test images")

    print_main(f"model: {cfg['model']} {args} act={cfg['act']} criterion={cfg['criterion']}")
    model, arr = build_model(cfg, args, device)
    n_parameters = sum(p.numel() for p in model.parameters())
    if D.is_distributed() and cfg["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if D.is_distributed():
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=cfg["find_unused_params"])

    optimizer = build_optimizer(cfg, model_without_ddp)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    autocast, scaler = mixed_precision(cfg, device)
    criterion = nn.CrossEntropyLoss()

    start_epoch, best_acc1 = cfg["start_epoch"], 0.0
    scheduler.step_update(start_epoch * len(loader))  # a fresh run from start_epoch > 0 starts the schedule there
    if cfg["resume"]:
        state = load_checkpoint(cfg["resume"], map_location=device)
        load_weights(state, model_without_ddp, arr, cfg["resume"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_acc1 = state["epoch"] + 1, state["best_acc1"]
        print_main(f"resumed from {cfg['resume']} at epoch {start_epoch}")
        if cfg["drop_lr_now"]:
            drop_lr_now(scheduler, optimizer)
            print_main("drop_lr_now: learning rates from here on are 0.1 times the schedule's")

    out = Path(cfg["output_dir"])
    main = D.is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg)
        trim_log(out / "log.txt", start_epoch)
    writer = SummaryWriter(str(out / "tensorboard")) if main else None
    log: dict[str, Any] = {}
    print_main(f"training {start_epoch} -> {cfg['epochs']} epochs, {len(loader)} iterations each, output in {out}")
    for epoch in range(start_epoch, cfg["epochs"]):
        seed_everything(epoch_seed(cfg, epoch))
        sampler.set_epoch(epoch)
        start = time.time()
        train_stats = train_one_epoch(model, arr, criterion, optimizer, scheduler, scaler, autocast, loader, device,
                                      epoch, cfg)
        log = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **train_stats}
        last = epoch + 1 == cfg["epochs"]
        if (epoch + 1) % cfg["eval_interval"] == 0 or last:
            metrics = evaluate(model_without_ddp, arr, val_loader, device, autocast, args["num_classes"])
            log.update(test_loss=metrics["loss"], test_acc1=metrics["acc1"], test_acc5=metrics["acc5"])
        log.update(epoch_time=time.time() - start, n_parameters=n_parameters)

        improved = "test_acc1" in log and (log["test_acc1"] > best_acc1 or not (out / "checkpoint_best.pth").exists())
        best_acc1 = max(best_acc1, log.get("test_acc1", 0.0))
        if main:
            state = checkpoint_state(model_without_ddp, arr, optimizer, scheduler, scaler, epoch, best_acc1, cfg, args)
            save_checkpoint(state, out / "checkpoint.pth")
            if improved:
                save_checkpoint(state, out / "checkpoint_best.pth")
            if (epoch + 1) % cfg["save_interval"] == 0 or last:
                save_checkpoint(state, out / f"checkpoint_{epoch:04d}.pth")
            with open(out / "log.txt", "a") as f:
                f.write(json.dumps(log) + "\n")
            for key, value in log.items():
                writer.add_scalar(key, value, epoch)
            print(epoch_summary(log, cfg["epochs"]), flush=True)
        D.barrier()
    if writer is not None:
        writer.close()
    return {**log, "best_acc1": best_acc1, "output_dir": str(out)}


def print_main(message: str) -> None:
    if D.is_main_process():
        print(message, flush=True)


def epoch_summary(log: dict, epochs: int) -> str:
    """One line per epoch on the console."""
    test = "".join(f"  {k} {log[k]:.4f}" for k in LOG_TEST_KEYS if k in log)
    return (f"epoch {log['epoch'] + 1}/{epochs}  lr {log['lr']:.2e}  train_loss {log['train_loss']:.4f} "
            f"(ce {log['train_ce']:.4f}, arr {log['train_arr']:.4f}){test}  {log['epoch_time']:.1f}s")


def evaluate_checkpoint(cfg: dict, checkpoint: str) -> dict[str, Any]:
    """Evaluate a checkpoint on the test set (ARR memory included), print the figures and write eval.json."""
    device = D.select_device(cfg["device"])
    D.init_distributed(device)
    try:
        state = load_checkpoint(checkpoint, map_location=device)
        args = state.get("model_args") or model_args(cfg)
        model, arr = build_model(cfg, args, device)
        load_weights(state, model, arr, checkpoint)
        autocast, _ = mixed_precision(cfg, device)
        metrics = evaluate(model, arr, test_loader(cfg, build_dataset(cfg, train=False)), device, autocast,
                           args["num_classes"])
        metrics = {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), **metrics}
        if D.is_main_process():
            out = Path(cfg["output_dir"])
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "eval.json", metrics)
            print(eval_summary(metrics, out / "eval.json"), flush=True)
        return metrics
    finally:
        D.cleanup()


def eval_summary(metrics: dict, path: Path) -> str:
    """The evaluation figures as a few console lines."""
    lines = [f"{k:>10}: {metrics[k]:.4f}" for k in ("acc1", "acc5", "loss", "precision", "recall", "f1", "arr_loss")
             if k in metrics]
    per_class = "  ".join(f"{k}:{v:.1f}" for k, v in metrics["per_class_acc1"].items())
    return "\n".join([f"evaluated {metrics['checkpoint']} on {metrics['num_samples']} test images"] + lines
                     + [f"per-class acc1: {per_class}", f"written to {path}"])
