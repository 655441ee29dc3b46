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
    "configs": ("configs", "list the built-in configs (dnrt train -c NAME runs one from any folder)"),
    "export": ("export", "write a trained model as ONNX, torch.export (.pt2) or TorchScript for inference"),
    "build-kernels": ("build_kernels", "build dnrt's C++ CPU kernels now (else their first use does, ~30 s)"),
}
RUN_COMMANDS = {"train": "train a model from a config",
                "eval": "evaluate a checkpoint (top-1/5, loss, P/R/F1, per class)"}
OVERRIDES_HELP = ("every config key is an option: --key value, --key=value, a bare --flag for True, several words for "
                  "a list (--milestones 30 60); a value is a Python literal where it parses, else text")


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of `dnrt train`, `dnrt eval` and main.py: -c CONFIG and every config key, grouped."""
    from dnrt.tool.config import key_parser

    parser = key_parser(prog=prog, description=description, epilog=OVERRIDES_HELP,
                        usage="%(prog)s [-c CONFIG] [-r CKPT] [--eval] [--key value ...]")
    parser.add_argument("-h", "--help", action="help", help="show this help and exit")
    parser.add_argument("-c", "--config", help="python config file (module-level variables; `from _base_ import *` "
                                               "works); without it, eval takes the checkpoint's own config")
    return parser


def run_tool(argv: Sequence[str], parser: argparse.ArgumentParser, eval_only: bool = False) -> int:
    """Resolve the config (file + overrides, or the checkpoint's own for eval) and train or evaluate."""
    from dnrt.tool.config import COMMAND_LINE, load_config, namespace_values, resolve, unknown_options

    args, rest = parser.parse_known_args(list(argv))
    overrides = {**unknown_options(rest), **namespace_values(args)}
    if eval_only:
        overrides["eval"] = True
    if args.config:
        cfg = load_config(args.config, overrides)
    elif overrides.get("eval") and overrides.get("resume"):
        from dnrt.tool.checkpoint import load_checkpoint

        saved = load_checkpoint(overrides["resume"]).get("config") or {}
        sources = {**{k: f"the config of {overrides['resume']}" for k in saved}, **{k: COMMAND_LINE for k in overrides}}
        cfg = resolve({**saved, **overrides}, Path(overrides["resume"]).parent.name, sources)
    else:
        raise DNRTError("give a config with -c CONFIG (or, to evaluate, a checkpoint with -r CKPT --eval)")

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
            note = f" Note: {cfg['note']}" if cfg["note"] else ""
            print(f"done: best test top-1 {result['best_acc1']:.2f}%, last {result['test_acc1']:.2f}%. "
                  f"Outputs in {result['output_dir']}: config.json, log.txt, checkpoint.pth, checkpoint_best.pth, "
                  f"tensorboard/.{note}", flush=True)
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
    for name, help_text in RUN_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # parsed by run_parser: see main()
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
        for line in str(e).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
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
        if command in RUN_COMMANDS:
            return run_tool(argv[1:], run_parser(f"dnrt {command}", RUN_COMMANDS[command]), command == "eval")
        args = parser.parse_args(argv)
        return int(_load_command(args.command).run(args) or 0)

    return _user_facing(run)


def main_py(argv: Sequence[str] | None = None) -> int:
    """The authors' command line: python main.py -c CONFIG [-r/--resume CKPT] [--eval] [--key value ...]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _user_facing(lambda: run_tool(argv, run_parser("main.py", "Train or evaluate a DNRT model from a config")))
