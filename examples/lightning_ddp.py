"""RAA + ARR in a LightningModule, trained with Lightning's DDP on two CPU processes (scikit-learn's digits).

    python examples/lightning_ddp.py --out runs/lightning            # train, save last.ckpt
    python examples/lightning_ddp.py --out runs/lightning --resume   # continue from last.ckpt

ARR is a submodule of the LightningModule, so its memory (buffers) is in `state_dict` and so in Lightning's
checkpoints, and `fit(ckpt_path=...)` restores it. Under DDP the memory gathers every process's responses each step
(`dnrt.ResponseMemory(sync=True)`), so all processes hold the same memory. Each process writes its memory after
training (and, on resume, once restored) to `--out` as memory_rank<r>.pt / restored_rank<r>.pt, for the test.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnrt


class DNRTClassifier(L.LightningModule):
    """An MLP whose GELUs become RAA (dnrt.convert), trained with cross-entropy + ARR on its two hidden layers."""

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, num_classes))
        dnrt.convert(self.model, torch.zeros(2, in_features))
        self.arr = dnrt.ARR(self.model, num_classes, layers=["1", "3"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        ce = nn.functional.cross_entropy(self.model(x), y)
        loss = ce + self.arr.loss(y)
        self.log_dict({"ce": ce, "loss": loss})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class SaveMemory(L.Callback):
    """Writes each process's ARR memory once training starts (after a restore) and when it ends."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, module: DNRTClassifier) -> None:
        if trainer.ckpt_path:
            torch.save(module.arr.state_dict(), self.out / f"restored_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: L.Trainer, module: DNRTClassifier) -> None:
        torch.save(module.arr.state_dict(), self.out / f"memory_rank{trainer.global_rank}.pt")


def digits() -> DataLoader:
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y))
    return DataLoader(data, batch_size=32, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resume", action="store_true", help="continue from --out/last.ckpt for 2 more steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    last = args.out / "last.ckpt"
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=args.steps + 2 * args.resume,
                        default_root_dir=args.out, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True),
                                   SaveMemory(args.out)])
    trainer.fit(DNRTClassifier(), digits(), ckpt_path=last if args.resume else None)


if __name__ == "__main__":
    main()
