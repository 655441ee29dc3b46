"""Training and evaluation, written like torchvision's references/classification/train.py: top to bottom."""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dnrt.errors import DNRTError
from dnrt.tool import distributed as D
from dnrt.tool import rundir as R
from dnrt.tool import threads
from dnrt.tool.rundir import checkpoint_state, load_checkpoint, load_weights, non_finite_tensors, save_checkpoint
from dnrt.tool.config import ignored
from dnrt.tool.data import build_dataset, dataset_info, location
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


def build_model(cfg: dict, args: dict[str, int], device: torch.device,
                fresh: bool = True) -> tuple[nn.Module, Any]:
    """The model with `act` swapped in, and ARR on it when criterion == 'arr', both on `device`; a `fresh` run
    starts from the pretrained weights the config names (a resumed one from its checkpoint)."""
    weights = {"pretrained": cfg["pretrained"], "pretrained_file": cfg["pretrained_file"]} if fresh else {}
    model = create_model(cfg["model"], act=cfg["act"], model_lib=cfg["model_lib"], model_kwargs=cfg["model_kwargs"],
                         **weights, **args)
    arr = build_arr(model, cfg, args["num_classes"])
    model.to(device)
    if arr is not None:
        arr.to(device)
    return model, arr


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which ends the run and then shuts them down (a
    worker the signal killed makes the loader's shutdown print a traceback); they were forked with the signals
    blocked (`batches`), so none reaches them before this."""
    for s in SignalStop.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SignalStop.SIGNALS)


def batches(loader: DataLoader) -> Iterator:
    """iter(loader) with SIGTERM/SIGINT blocked while it forks the workers (a signal meanwhile waits, then counts)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SignalStop.SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SignalStop.SIGNALS)


def test_loader(cfg: dict, dataset: Dataset) -> DataLoader:
    """This process's share of the test set, without the padding a DistributedSampler would add."""
    shard = Subset(dataset, range(D.get_rank(), len(dataset), D.get_world_size()))
    return DataLoader(shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"],
                      pin_memory=cfg["pin_memory"] and torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)


def train_loader(cfg: dict, dataset: Dataset) -> tuple[DataLoader, DistributedSampler]:
    """A DistributedSampler even for one process: shuffling then depends only on seed and epoch."""
    sampler = DistributedSampler(dataset, num_replicas=D.get_world_size(), rank=D.get_rank(), shuffle=True,
                                 seed=cfg["seed"])
    drop_last = len(sampler) > cfg["batch_size"] if cfg["drop_last"] is None else cfg["drop_last"]
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=cfg["pin_memory"] and torch.cuda.is_available(), drop_last=drop_last,
                        persistent_workers=cfg["num_workers"] > 0, worker_init_fn=ignore_stop_signals)
    return loader, sampler


def close_workers(loader: DataLoader) -> None:
    """End the persistent workers of `loader` now, also when the run ends by an exception: a traceback that holds the
    loader would keep them alive, and since they ignore SIGTERM, the interpreter's exit (multiprocessing terminates,
    then joins its daemonic children) would wait for them forever. DataLoader has no public call for this."""
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' total L2 norm as a device tensor, clipped to max_norm when set (clip_grad_norm_ returns it)."""
    if max_norm:
        return nn.utils.clip_grad_norm_(params, max_norm)
    return nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def step_if(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], ok: torch.Tensor) -> None:
    """optimizer.step(), its result kept only where the device flag `ok` holds (torch.where): a step whose loss or
    gradient is non-finite never lands in the weights, and deciding it needs no host sync."""
    before = [D.local(p).detach().clone() for p in params]
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, before):
            D.local(p).copy_(torch.where(ok, D.local(p), old))


class NonFinite(DNRTError):
    """A non-finite loss or gradient norm stopped the run; train() adds which checkpoint is still good."""


class Clock:
    """Time left for the whole run, from the iterations done since it started (evaluations included)."""

    def __init__(self, iterations: int) -> None:
        self.start, self.done, self.total = time.time(), 0, iterations

    def tick(self) -> None:
        self.done += 1

    def eta(self) -> str:
        left = (time.time() - self.start) / max(self.done, 1) * (self.total - self.done)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86_400 else f"{left / 86_400:.1f} days"


STATS = 5  # the device sums of one epoch: total loss·n, ce·n, arr·n, n, fp16 steps the scaler skipped


def train_one_epoch(model: nn.Module, arr: Any, loss_fn: Callable, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, autocast: Callable, loader: DataLoader, device: torch.device,
                    epoch: int, cfg: dict, clock: Clock | None = None) -> dict[str, float]:
    """One pass over the training set; returns the mean total, cross-entropy and ARR losses over all processes,
    images/s and, with fp16's GradScaler, the steps it skipped. Losses and the non-finite checks stay on the device
    and are read once every print_freq iterations and at the end: no host sync per step."""
    model.train()
    if arr is not None:
        arr.train()
    clock = clock or Clock(len(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    stats = torch.zeros(STATS, dtype=torch.float64, device=device)
    first_bad = torch.full((2,), -1, dtype=torch.long, device=device)  # iteration of the first bad loss, grad norm
    start = read_at = time.time()
    seen = 0
    bar = tqdm(batches(loader), total=len(loader), desc=f"epoch {epoch}", dynamic_ncols=True, leave=False,
               disable=not D.is_main_process() or not sys.stderr.isatty())
    for i, (images, targets) in enumerate(bar):
        STOP.check()
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            ce, reg = loss_fn(images, targets)
            loss = ce + reg
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = D.local(grad_norm(params, cfg["clip_max_norm"]))  # FSDP2: a replicated DTensor
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm)])
        if scaler.is_enabled():  # fp16: the scaler skips steps whose gradients overflowed, by design; count them
            stats[4] += bad[1]
            bad[1] = False
        first_bad = torch.where(bad & (first_bad < 0), i, first_bad)
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            step_if(optimizer, params, (first_bad < 0).all())
        scheduler.step_update(epoch * len(loader) + i + 1)
        n = images.shape[0]
        stats[:3] += torch.stack([t.detach().double() for t in (loss, ce, reg)]) * n
        stats[3] += n
        clock.tick()
        if (i + 1) % cfg["print_freq"] == 0 or i + 1 == len(loader):
            values = torch.cat([stats, first_bad.double()]).tolist()  # the one read of this stretch
            check_finite(values[STATS:], epoch)
            if (i + 1) % cfg["print_freq"] == 0:
                seen = report(bar, values, optimizer, epoch, i, len(loader), seen, time.time() - read_at, clock)
                read_at = time.time()
    elapsed = time.time() - start
    total, ce, reg, n, skipped = D.reduce_sum(values[:STATS], device)
    result = {"train_loss": total / n, "train_ce": ce / n, "train_arr": reg / n,
              "images_per_s": n / elapsed if elapsed > 0 else None}
    if scaler.is_enabled():  # every process skips the same steps (their gradients are all-reduced)
        result["skipped_steps"] = round(skipped / D.get_world_size())
    return result


def check_finite(first_bad: list[float], epoch: int) -> None:
    """Stop the run when a loss or gradient norm was non-finite (its step was not applied)."""
    loss_at, norm_at = (int(v) for v in first_bad)
    if loss_at >= 0 or norm_at >= 0:
        what, at = ("loss", loss_at) if loss_at >= 0 and (norm_at < 0 or loss_at <= norm_at) else ("gradient norm",
                                                                                                    norm_at)
        raise NonFinite(f"non-finite {what} at epoch {epoch}, iteration {at}: that update was not applied and "
                        f"training stopped (lower lr, set clip_max_norm, or check the data)")


def report(bar: tqdm, values: list[float], optimizer: torch.optim.Optimizer, epoch: int, i: int, iterations: int,
           seen: int, seconds: float, clock: Clock) -> int:
    """The progress bar's (or, off a terminal, one line's) loss so far, lr, images/s and time left for the run."""
    n = int(values[3])
    rate = (n - seen) * D.get_world_size() / seconds if seconds > 0 else 0.0
    loss, lr, eta = values[0] / n, optimizer.param_groups[0]["lr"], clock.eta()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", eta=eta)
    if bar.disable and D.is_main_process():
        print(f"epoch {epoch} [{i + 1}/{iterations}] loss {loss:.4f} lr {lr:.2e} {rate:.0f} img/s, run ends in {eta}",
              flush=True)
    return n


@torch.no_grad()
def evaluate(model: nn.Module, arr: Any, loader: DataLoader, device: torch.device, autocast: Callable,
             num_classes: int) -> dict[str, Any]:
    """Top-1/top-5, loss, macro precision/recall/F1 and per-class accuracy over the whole test set (all processes)."""
    model.eval()
    if arr is not None:
        arr.eval()  # the memory is read, never written
    preds, targets_all, top5, losses, arr_sum = [], [], [], [], 0.0
    one = None
    for images, targets in batches(loader):
        STOP.check()
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        one = images[:1]
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
    if D.is_distributed() and D.is_sharded(model) and one is not None:
        D.even_out(len(preds), lambda: model(one))
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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def make_loss(model: nn.Module, arr: Any, criterion: nn.Module, compile_mode: bool | str) -> Callable:
    """(images, targets) -> (cross-entropy, ARR term) of one batch; compiled with torch.compile when `compile_mode`
    is True or one of its mode names."""
    def loss_fn(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        ce = criterion(logits, targets)
        return ce, arr.loss(targets) if arr is not None else torch.zeros_like(ce)

    if compile_mode is False or compile_mode is None:
        return loss_fn
    if compile_mode is not True and compile_mode not in COMPILE_MODES:
        raise DNRTError(f"compile must be False, True or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                        f"got {compile_mode!r}")
    return torch.compile(loss_fn, mode=None if compile_mode is True else compile_mode)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT ended the run; the CLI prints the message and exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class SignalStop:
    """SIGTERM (what schedulers send before preemption) and SIGINT as a request to stop: the handler only notes it and
    the loop raises Stopped at its next batch (`check`), never inside a write, a fork or a lock, so the run ends with
    its last finished epoch saved whole; a second signal raises at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.pending: int | None = None
        self.owner = os.getpid()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalStop":
        self.pending, self.owner = None, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner:  # a data-loader worker, forked before it set the signals aside
            return
        again = self.pending is not None
        self.pending = signum
        if again:
            self.check()

    def check(self) -> None:
        """Raise Stopped when a signal has arrived."""
        if self.pending is not None:
            name = signal.Signals(self.pending).name
            raise Stopped(f"stopped by {name}; the same command continues the run", self.pending)


STOP = SignalStop()  # signals are the process's: one instance, installed by train()


def stopped(signum: int, latest: Path, done: int) -> Stopped:
    """The one line that ends a run stopped by a signal."""
    return Stopped(f"stopped by {signal.Signals(signum).name}: {saved_state(latest, done)}; the same command "
                   f"continues the run", signum)


def saved_state(latest: Path, done: int) -> str:
    """Which checkpoint is still good (the run's latest, or the one it resumed from), for the line that ends a
    stopped or failed run."""
    if done == 0:
        return f"no epoch had finished, so {latest.parent} holds no checkpoint"
    return f"{latest} holds the {finished_epochs(done)} and is good"


def finished_epochs(n: int) -> str:
    return f"{n} finished epoch{'' if n == 1 else 's'}"


def resume_point(state: dict, cfg: dict, path: str) -> tuple[int, list[dict]]:
    """The epoch a resume starts at and the config's `resumes` list with this resume appended; refuses a config
    that changes the result (anything but the neutral keys and a larger `epochs`) or leaves nothing to train."""
    saved, done = state.get("config") or {}, state["epoch"] + 1
    if done >= cfg["epochs"]:
        raise DNRTError(f"checkpoint {path} has {done} finished epochs and epochs is {cfg['epochs']}: nothing to "
                        f"train; give --epochs larger than {done} to train it on")
    changes = R.result_changes(saved, cfg)
    if changes:
        raise DNRTError(f"checkpoint {path} was trained with another config ({R.describe(changes)}); a resume may "
                        f"change only {', '.join(R.NEUTRAL_KEYS)} and increase epochs; train anew in another "
                        f"output_dir for other settings")
    changed = {k: [old, new] for k, (old, new) in R.changed_keys(saved, cfg).items()}
    return done, [*state.get("resumes", []), {"epoch": done, "checkpoint": str(path), "changed": changed}]


def start_files(out: Path, cfg: dict, resumes: list[dict], start_epoch: int, checkpoint: str | None) -> None:
    """Prepare output_dir: remove a killed process's temporary files, write config.json, keep the finished epochs'
    log lines."""
    R.usable_folder(out)
    try:
        R.remove_temp_files(out)
        R.record(out, R.CONFIG, R.LOG)
        R.write_config(out, cfg, resumes)
        R.start_log(out, start_epoch)
    except OSError as e:
        kept = f"; {checkpoint} ({finished_epochs(start_epoch)}) is untouched" if checkpoint else ""
        raise DNRTError(f"cannot write to output_dir {out}: {e.strerror or e}{kept}") from None


def save_epoch(out: Path, log: dict, state: dict, names: list[str], latest: Path, done: int) -> None:
    """The epoch's log line, then its checkpoints, checkpoint.pth last (a run killed in between redoes the epoch).
    Non-finite weights are never written; a write that fails says which checkpoint is still good."""
    bad = non_finite_tensors(state["model"]) + non_finite_tensors(state["arr"])
    if bad:
        raise DNRTError(f"the weights became non-finite in epoch {log['epoch']} ({', '.join(bad[:3])}); not saved; "
                        f"{saved_state(latest, done)}")
    path = out / R.LOG
    try:
        R.record(out, *names)
        R.append_log(out, log)
        for name in names:
            path = out / name
            save_checkpoint(state, path)
    except OSError as e:
        raise DNRTError(f"cannot write {path}: {e.strerror or e}; {saved_state(latest, done)}") from None


def tensorboard(out: Path) -> SummaryWriter:
    """The run's TensorBoard writer; its new events file goes into the manifest (the folder's other events files
    may be another program's)."""
    board = out / R.TENSORBOARD
    before = set(board.iterdir()) if board.is_dir() else set()
    writer = SummaryWriter(str(board))
    R.record(out, *(p.relative_to(out).as_posix() for p in sorted(set(board.iterdir()) - before)))
    return writer


def use_threads(cfg: dict, dataset: Dataset, model: nn.Module, args: dict[str, int], device: torch.device) -> None:
    """The intra-op threads and data workers threads.choose picks, logged once; cfg['num_workers'] (and so
    config.json) records the workers used."""
    example = torch.zeros(1, args["in_chans"], args["img_size"], args["img_size"], device=device)
    choice = threads.choose(cfg, dataset, model, example, device)
    cfg["num_workers"] = choice["workers"]
    print_main(choice["line"])


def train(cfg: dict) -> dict[str, Any]:
    """Train for cfg['epochs'] epochs in cfg['output_dir'] (continuing the unfinished run there, or resuming from
    cfg['resume']), writing the run directory; returns final metrics."""
    device = D.select_device(cfg["device"])
    D.refuse_no_dist(cfg["no_dist"])
    D.init_distributed(device)
    note = ignored(cfg, D.is_distributed(), device.type)
    if note:
        print_main(note)
    previous = torch.get_num_threads()
    try:
        with STOP, R.owned(cfg["output_dir"], D.is_main_process()):
            return _train(cfg, device)
    finally:
        torch.set_num_threads(previous)
        D.cleanup()


def _train(cfg: dict, device: torch.device) -> dict[str, Any]:
    out = Path(cfg["output_dir"])
    main = D.is_main_process()
    plan = D.broadcast_object(R.plan_run(cfg) if main else None)
    if plan.message:
        print_main(plan.message)
    if plan.action == "finished":
        return {"best_acc1": R.best_and_last(R.read_log(out))[0], "output_dir": str(out), "finished_before": True}
    seed_everything(cfg["seed"])
    args = model_args(cfg)
    train_set, test_set = build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    print_main(f"data: {cfg['dataset']} from {location(train_set, cfg)}: {len(train_set)} training, "
               f"{len(test_set)} test images")

    print_main(f"model: {cfg['model']} {args} act={cfg['act']} criterion={cfg['criterion']}")
    model, arr = build_model(cfg, args, device, fresh=plan.checkpoint is None)
    use_threads(cfg, train_set, model, args, device)
    loader, sampler = train_loader(cfg, train_set)
    val_loader = test_loader(cfg, test_set)
    if len(loader) == 0:
        raise DNRTError(f"no training batch: {cfg['dataset']} has {len(sampler)} training images per process, "
                        f"fewer than batch_size={cfg['batch_size']} with drop_last=True" if len(sampler)
                        else f"the training set of {cfg['dataset']} is empty")
    conversion = model.__dict__.get("_dnrt_conversion")
    cfg_record = {**cfg, "converted_activations": conversion.to_dict() if conversion else None}
    n_parameters = sum(p.numel() for p in model.parameters())
    if D.is_distributed() and cfg["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    start_epoch, best_acc1, resumes, lr_scale = cfg["start_epoch"], 0.0, [], 1.0
    if plan.checkpoint:  # the weights before FSDP shards them
        state = load_checkpoint(plan.checkpoint, map_location=device)
        start_epoch, resumes = resume_point(state, cfg, plan.checkpoint)
        load_weights(state, model, arr, plan.checkpoint)
    model_without_ddp = model
    if D.is_distributed():
        model = D.wrap(model, cfg["strategy"], device, cfg["find_unused_params"])

    optimizer = build_optimizer(cfg, model_without_ddp)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    autocast, scaler = mixed_precision(cfg, device)
    loss_fn = make_loss(model, arr, nn.CrossEntropyLoss(), cfg["compile"])

    if plan.checkpoint:
        D.load_optimizer(model_without_ddp, optimizer, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        best_acc1 = state["best_acc1"]
        if not plan.message:
            print_main(f"resumed from {plan.checkpoint} at epoch {start_epoch}")
        lr_scale = state.get("lr_scale", 1.0)
        if cfg["drop_lr_now"] and not (state.get("config") or {}).get("drop_lr_now"):
            lr_scale *= 0.1  # once, where the flag first appears: the same command again does not drop again
            print_main("drop_lr_now: learning rates from here on are 0.1 times the schedule's")
    if lr_scale != 1.0:
        drop_lr_now(scheduler, optimizer, lr_scale)
    scheduler.step_update(start_epoch * len(loader))  # the schedule of this run's length at its start or resume point
    if main:
        if plan.checkpoint and plan.checkpoint == cfg["resume"] and (out / R.LOG).is_file():  # -r given: check
            R.check_log(out, start_epoch, plan.checkpoint, R.first_epoch(out, resumes))
        start_files(out, cfg_record, resumes, start_epoch, plan.checkpoint)
    D.barrier()
    writer = tensorboard(out) if main else None
    log: dict[str, Any] = {}
    print_main(f"training {start_epoch} -> {cfg['epochs']} epochs, {len(loader)} iterations each, output in {out}")
    clock = Clock((cfg["epochs"] - start_epoch) * len(loader))
    latest, done = Path(plan.checkpoint or out / R.LATEST), start_epoch  # the checkpoint that is good so far
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            seed_everything(epoch_seed(cfg, epoch))
            sampler.set_epoch(epoch)
            start = time.time()
            train_stats = train_one_epoch(model, arr, loss_fn, optimizer, scheduler, scaler, autocast, loader,
                                          device, epoch, cfg, clock)
            log = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **train_stats}
            last = epoch + 1 == cfg["epochs"]
            if (epoch + 1) % cfg["eval_interval"] == 0 or last:
                metrics = evaluate(model_without_ddp, arr, val_loader, device, autocast, args["num_classes"])
                log.update(test_loss=metrics["loss"], test_acc1=metrics["acc1"], test_acc5=metrics["acc5"])
            log.update(epoch_time=time.time() - start, n_parameters=n_parameters)
            evaluated = "test_acc1" in log and all(math.isfinite(log[k]) for k in LOG_TEST_KEYS)
            improved = evaluated and (log["test_acc1"] > best_acc1 or not (out / R.BEST).exists())
            if improved:
                best_acc1 = log["test_acc1"]
            weights, optimizer_state = D.full_state(model_without_ddp, optimizer)  # FSDP: every process gathers
            if main:
                state = checkpoint_state(weights, arr, optimizer_state, scaler, epoch, best_acc1, cfg, args, resumes,
                                         lr_scale)
                names = [R.BEST] * improved + [R.numbered(epoch)] * ((epoch + 1) % cfg["save_interval"] == 0
                                                                     or last) + [R.LATEST]
                save_epoch(out, log, state, names, latest, done)
                for key, value in log.items():
                    if isinstance(value, (int, float)):
                        writer.add_scalar(key, value, epoch)
                print(epoch_summary(log, cfg["epochs"]), flush=True)
            latest, done = out / R.LATEST, epoch + 1
            D.barrier()
    except Stopped as e:
        raise stopped(e.signum, latest, done) from None
    except NonFinite as e:
        raise DNRTError(f"{e}; {saved_state(latest, done)}") from None
    except RuntimeError:  # under torchrun, a process that stopped first breaks its peers' collectives
        if STOP.pending is None:
            raise
        raise stopped(STOP.pending, latest, done) from None
    finally:
        close_workers(loader)
        if writer is not None:
            writer.close()
    return {**log, "best_acc1": best_acc1, "output_dir": str(out)}


def print_main(message: str) -> None:
    if D.is_main_process():
        print(message, flush=True)


def epoch_summary(log: dict, epochs: int) -> str:
    """One line per epoch on the console."""
    test = "".join(f"  {k} {log[k]:.4f}" for k in LOG_TEST_KEYS if k in log)
    rate = f", {log['images_per_s']:.0f} img/s" if log.get("images_per_s") else ""
    skipped = f", {log['skipped_steps']} fp16 steps skipped" if log.get("skipped_steps") else ""
    return (f"epoch {log['epoch'] + 1}/{epochs}  lr {log['lr']:.2e}  train_loss {log['train_loss']:.4f} "
            f"(ce {log['train_ce']:.4f}, arr {log['train_arr']:.4f}){test}  {log['epoch_time']:.1f}s{rate}{skipped}")


def evaluate_checkpoint(cfg: dict, checkpoint: str, out: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on the test set (ARR memory included), print the figures and write eval.json beside
    the checkpoint (or to `out`): never into the output_dir its config records, which may be another copy's."""
    device = D.select_device(cfg["device"])
    D.init_distributed(device)
    previous = torch.get_num_threads()
    try:
        state = load_checkpoint(checkpoint, map_location=device)
        args = data_fits(state.get("model_args"), model_args(cfg), checkpoint, cfg["dataset"])
        model, arr = build_model(cfg, args, device, fresh=False)
        load_weights(state, model, arr, checkpoint)
        autocast, _ = mixed_precision(cfg, device)
        test_set = build_dataset(cfg, train=False)
        use_threads(cfg, test_set, model, args, device)
        metrics = evaluate(model, arr, test_loader(cfg, test_set), device, autocast, args["num_classes"])
        metrics = {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), **metrics}
        if D.is_main_process():
            print(eval_summary(metrics, R.write_eval(out or Path(checkpoint).parent, metrics)), flush=True)
        return metrics
    finally:
        torch.set_num_threads(previous)
        D.cleanup()


def data_fits(saved: dict[str, int] | None, wanted: dict[str, int], checkpoint: str, dataset: str) -> dict[str, int]:
    """The model's arguments, once the dataset is seen to fit what the checkpoint was trained for (classes,
    channels, image size): another dataset is one line naming both, not a shape error deep in the model."""
    if not saved:
        return wanted
    differ = [k for k in ("num_classes", "in_chans", "img_size") if k in saved and saved[k] != wanted[k]]
    if differ:
        trained = ", ".join(f"{k}={saved[k]}" for k in differ)
        given = ", ".join(f"{k}={wanted[k]}" for k in differ)
        raise DNRTError(f"checkpoint {checkpoint} was trained for {trained}, but dataset {dataset} has {given}; "
                        f"evaluate it on a dataset like the one it was trained on")
    return saved


def eval_summary(metrics: dict, path: Path) -> str:
    """The evaluation figures as a few console lines."""
    lines = [f"{k:>10}: {metrics[k]:.4f}" for k in ("acc1", "acc5", "loss", "precision", "recall", "f1", "arr_loss")
             if k in metrics]
    per_class = "  ".join(f"{k}:{v:.1f}" for k, v in metrics["per_class_acc1"].items())
    return "\n".join([f"evaluated {metrics['checkpoint']} on {metrics['num_samples']} test images"] + lines
                     + [f"per-class acc1: {per_class}", f"written to {path}"])
