"""Lesson 00, first step: raw HTML, Markdown and text documents -> clean text cut into chunks a generator can read.

Navigation, scripts, link targets, images, front matter and metadata lines never become questions, so they go
here; each chunk keeps whole paragraphs and remembers which document it came from.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trafilatura

from helpers.data import DataError, Problem

RAW_SUFFIXES = (".html", ".htm", ".md", ".markdown", ".txt")
FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)
# Link text and target exclude their own opening bracket: each attempt stops at the next `[` (or `(`), so a document
# full of `[` is scanned in linear time (`[^\]]*` rescanned to the end for every `[`: hours for 1 MB).
MARKDOWN_IMAGE = re.compile(r"!\[[^\[\]]*\]\([^()]*\)")
MARKDOWN_LINK = re.compile(r"\[([^\[\]]+)\]\([^()]*\)")
URL = re.compile(r"\(?\bhttps?://\S+")
METADATA_LINE = re.compile(r"^(maintainer|owner|source|version|author|copyright)\b.*$", re.IGNORECASE | re.MULTILINE)
MAX_DOCUMENT_BYTES = 2_000_000  # a raw document larger than this is skipped (a book is not one lesson's source)


@dataclass
class Chunk:
    """A piece of one document small enough for the generator; `id` changes when its text changes."""

    source: str
    index: int
    subject: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}#{self.index}:{hashlib.sha256(self.text.encode()).hexdigest()[:12]}"


def clean_text(raw: str, suffix: str) -> str:
    """Plain text without HTML, navigation, links, images, front matter or metadata lines; tidy whitespace."""
    if suffix in (".html", ".htm"):
        # trafilatura keeps the main content and drops navigation, footers, scripts and link targets
        text = trafilatura.extract(raw, include_links=False, include_images=False, include_comments=False) or ""
        text = (text or trafilatura.html2txt(raw)).replace("\n", "\n\n")  # one block per line
    else:
        text = MARKDOWN_LINK.sub(r"\1", MARKDOWN_IMAGE.sub("", FRONT_MATTER.sub("", raw)))
    text = METADATA_LINE.sub("", URL.sub("", text))
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p.lstrip("#").strip() for p in paragraphs if p.strip())


def chunk_text(text: str, max_words: int) -> list[str]:
    """Whole paragraphs packed into chunks of at most `max_words` (a longer paragraph is split by words)."""
    chunks: list[str] = []
    current: list[list[str]] = []
    for paragraph in text.split("\n\n"):
        paragraph_words = paragraph.split()
        pieces = [paragraph_words[i : i + max_words] for i in range(0, len(paragraph_words), max_words)]
        for piece in pieces:
            if current and sum(map(len, current)) + len(piece) > max_words:
                chunks.append("\n\n".join(" ".join(p) for p in current))
                current = []
            current.append(piece)
    if current:
        chunks.append("\n\n".join(" ".join(p) for p in current))
    return chunks


def read_documents(
    folder: str | Path, max_words: int, max_bytes: int = MAX_DOCUMENT_BYTES
) -> tuple[list[Chunk], list[Problem], int]:
    """Chunks of every HTML, Markdown and text file in `folder`, the files that could not be used, and how many
    documents were read. An unreadable, binary or too large (over `max_bytes`) file is reported and skipped; a
    folder with no usable file is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Raw document folder {folder} does not exist.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    chunks, problems, documents = [], [], 0
    for path in files:
        where = str(path.relative_to(folder))
        if path.suffix.lower() not in RAW_SUFFIXES:
            problems.append(Problem(where, "unsupported type", f"not one of {', '.join(RAW_SUFFIXES)}"))
            continue
        try:
            size = path.stat().st_size
            if size > max_bytes:  # checked before reading: a huge file is never loaded into memory
                problems.append(
                    Problem(where, "too large", f"{size:,} bytes, over the limit of {max_bytes:,} bytes; split it")
                )
                continue
            data = path.read_bytes()
        except OSError as err:
            problems.append(Problem(where, "unreadable", f"cannot be read ({err.strerror})"))
            continue
        try:
            if b"\x00" in data:
                raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
            raw = data.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(where, "binary", f"not UTF-8 text (byte {err.start}); is it a binary file?"))
            continue
        text = clean_text(raw, path.suffix.lower())
        if not text:
            problems.append(Problem(where, "empty", "no text left after cleaning"))
            continue
        documents += 1
        subject = path.stem.replace("_", " ").replace("-", " ").capitalize()
        chunks += [Chunk(where, i, subject, piece) for i, piece in enumerate(chunk_text(text, max_words))]
    if not chunks:
        found = f" ({len(files)} files: {dict(Counter(p.reason for p in problems))})" if files else ""
        raise DataError(f"No usable documents in {folder}{found}; add .html, .md or .txt files.")
    return chunks, problems, documents
