"""English evaluation text: 106 Wikipedia articles (CC BY-SA 3.0) shipped as a test file inside the gensim wheel."""

from __future__ import annotations

import bz2
import importlib.util
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import mwparserfromhell

from .errors import ExportError
from .weights import cache_dir

__all__ = ["WIKIPEDIA_ATTRIBUTION", "wikipedia_text", "read_text"]

WIKIPEDIA_ATTRIBUTION = (
    "Text: English Wikipedia articles (enwiki dump excerpt shipped with gensim 4.4.0), CC BY-SA 3.0, "
    "https://en.wikipedia.org/wiki/Wikipedia:Copyrights"
)
_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _dump_path() -> Path:
    # find_spec only locates gensim; importing it would need scipy, which we do not install.
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ExportError("the default text needs the gensim wheel: pip install --no-deps gensim==4.4.0, or pass --text FILE")
    return Path(spec.origin).parent / _DUMP


def _strip_markup(wikitext: str) -> str:
    code = mwparserfromhell.parse(wikitext)
    # Footnotes would otherwise land inline in the prose.
    for tag in code.filter_tags(recursive=False, matches=lambda t: str(t.tag).lower() == "ref"):
        code.remove(tag)
    return code.strip_code(normalize=True, collapse=True)


def _articles(dump: Path):
    """Plain text of each main-namespace, non-redirect article, wiki markup stripped."""
    with bz2.open(dump, "rb") as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            ns = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            redirect = element.find("{*}redirect")
            if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
                lines = [line.strip() for line in _strip_markup(text.text).splitlines()]
                yield "\n".join(line for line in lines if line)
            element.clear()


def wikipedia_text() -> str:
    """The articles joined by blank lines (~2.5 M characters); parsed once, then read from the cache."""
    cached = cache_dir() / "enwiki-gensim-4.4.0.txt"
    if not cached.is_file():
        text = "\n\n".join(_articles(_dump_path()))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cached)
    return cached.read_text(encoding="utf-8")


def read_text(path: str | None) -> str:
    """The text of ``path`` (UTF-8, not empty, no NUL bytes), or the bundled Wikipedia text when ``path`` is None."""
    if path is None:
        return wikipedia_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read text file {path}: {e}") from e
    # checked here, before any model loads, rather than as "0 tokens" after it
    if not text.strip():
        raise ExportError(f"text file {path} is empty")
    if "\x00" in text:
        raise ExportError(f"{path} is not a text file: it holds NUL bytes")
    return text
