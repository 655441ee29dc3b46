"""The authors' entry point: python main.py -c CONFIG [-r CKPT] [--eval] [--key value ...]."""
import sys

try:
    from dnrt.tool.cli import main_py
except KeyboardInterrupt:  # Ctrl-C while torch loads: one line and 130, as at any later moment
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main_py())
