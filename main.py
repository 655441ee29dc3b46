"""The authors' entry point: python main.py -c CONFIG [-r CKPT] [--eval] [--key value ...]."""
import sys

from dnrt.tool.cli import main_py

sys.exit(main_py())
