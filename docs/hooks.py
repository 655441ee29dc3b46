"""MkDocs hook: the tool page's key tables, generated from dnrt/tool/keys.py each time the site is built."""
import sys
from pathlib import Path

MARKER = "<!-- keys: generated from dnrt/tool/keys.py when the site is built -->"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dnrt, not another installed one


def with_key_tables(markdown: str) -> str:
    """The page with its marker replaced by the tables of every config key, one per group."""
    from dnrt.tool import keys

    return markdown.replace(MARKER, keys.markdown())


def on_page_markdown(markdown: str, page, config, files) -> str:
    return with_key_tables(markdown) if MARKER in markdown else markdown
