"""`dnrt train|eval|plot|compare|profile|reproduce` and the authors' `python main.py -c CONFIG [-r CKPT] [--eval]`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from dnrt.errors import DNRTError

# subcommands of the other modules, imported only when chosen so a broken one breaks only itself
OTHER_COMMANDS = {
    "plot": ("plots", "plot training curves or per-class responses of a run"),
    "compare": ("compare", "compare runs side by side"),
    "profile": ("profile", "measure parameters, FLOPs and speed of a model with and without DNRT"),
    "reproduce": ("reproduce", "run or summarise the paper's tables as a grid of runs"),
}
OVERRIDES_HELP = "any config key as --key value (e.g. --epochs 2 --model_kwargs '{\"depth\": 2}') overrides the config"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dnrt train`, `dnrt eval` and main.py."""
    parser.add_argument("-c", "--config",
                        help="python config file (module-level variables; `from _base_ import *` works)")
    parser.add_argument("-r", "--resume", help="checkpoint to resume training from, or to evaluate with --eval")
    parser.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint on the test set")


def run_tool(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Resolve the config (file + overrides, or the checkpoint's own for eval) and train or evaluate."""
    from dnrt.tool.config import load_config, parse_overrides, resolve

    if args.config:
        cfg = load_config(args.config, overrides)
    elif args.eval and args.resume:
        from dnrt.tool.checkpoint import load_checkpoint

        saved = load_checkpoint(args.resume).get("config") or {}
        cfg = resolve({**saved, "resume": None, "eval": False, **parse_overrides(overrides)},
                      Path(args.resume).parent.name)
    else:
        raise DNRTError("give a config with -c CONFIG (or, to evaluate, a checkpoint with -r CKPT --eval)")
    if args.resume:
        cfg["resume"] = args.resume
    if args.eval:
        cfg["eval"] = True

    from dnrt.tool.graph import GRAPHS

    if cfg["dataset"] in GRAPHS:
        return run_graph(cfg)

    from dnrt.tool.train import evaluate_checkpoint, train

    if cfg["eval"]:
        if not cfg["resume"]:
            raise DNRTError("--eval needs a checkpoint: add -r CHECKPOINT")
        evaluate_checkpoint(cfg, cfg["resume"])
        return 0
    result = train(cfg)
    if "test_acc1" in result:
        from dnrt.tool.distributed import is_main_process

        if is_main_process():
            print(f"done: best test top-1 {result['best_acc1']:.2f}%, last {result['test_acc1']:.2f}%. "
                  f"Outputs in {result['output_dir']}: config.json, log.txt, checkpoint.pth, checkpoint_best.pth, "
                  f"tensorboard/", flush=True)
    return 0


def run_graph(cfg: dict) -> int:
    """Train a GNN on a graph dataset (dnrt.tool.graph); it logs its test metric every epoch, so no --eval."""
    from dnrt.tool.graph import train_graph

    if cfg["eval"] or cfg["resume"]:
        raise DNRTError(f"graph runs ({cfg['dataset']}) train in one go: they take no -r/--eval; "
                        f"log.txt has every epoch's test metric")
    result = train_graph(cfg)
    print(f"done: test {result['test_at_best_valid']:.2f} at the best validation epoch {result['epoch']} "
          f"(validation {result['best_valid']:.2f}). Outputs in {cfg['output_dir']}: config.json, log.txt", flush=True)
    return 0


def _load_command(name: str) -> ModuleType:
    module_name, _ = OTHER_COMMANDS[name]
    try:
        return importlib.import_module(f"dnrt.tool.{module_name}")
    except Exception as e:  # any failure to import makes only this subcommand unavailable
        raise DNRTError(f"`dnrt {name}` is unavailable: {type(e).__name__}: {e}") from None


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    """The `dnrt` parser; only the chosen subcommand of another module imports that module."""
    parser = argparse.ArgumentParser(prog="dnrt",
                                     description="Dynamic Neural Response Tuning: training and analysis tool",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a model from a config", epilog=OVERRIDES_HELP, allow_abbrev=False)
    add_run_arguments(train)
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (top-1/5, loss, P/R/F1, per class)",
                              epilog=OVERRIDES_HELP, allow_abbrev=False)
    add_run_arguments(evaluate)
    for name, (_, help_text) in OTHER_COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text)
        if name == command:
            _load_command(name).add_arguments(subparser)
    return parser


def _user_facing(run: Callable[[], int]) -> int:
    """Run a command; a user error prints one line `error: ...` and returns 1, never a traceback."""
    try:
        return run()
    except DNRTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # train's Stopped (SIGTERM/SIGINT) says which checkpoint continues the run
        print(str(e) or "interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # the reader of our output closed early (`dnrt ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `dnrt`."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        command = argv[0] if argv else None
        parser = _build_parser(command)
        if command in ("train", "eval"):
            args, overrides = parser.parse_known_args(argv)
            args.eval = args.eval or command == "eval"
            return run_tool(args, overrides)
        args = parser.parse_args(argv)
        return int(_load_command(args.command).run(args) or 0)

    return _user_facing(run)


def main_py(argv: Sequence[str] | None = None) -> int:
    """The authors' command line: python main.py -c CONFIG [-r/--resume CKPT] [--eval] [--key value ...]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="main.py", description="Train or evaluate a DNRT model from a config",
                                     epilog=OVERRIDES_HELP, allow_abbrev=False)
    add_run_arguments(parser)

    def run() -> int:
        args, overrides = parser.parse_known_args(argv)
        return run_tool(args, overrides)

    return _user_facing(run)
