"""What a learner reads in an executed notebook: outputs free of plumbing (issue 26, item 7).

`notebook_offences` reads one executed notebook and returns each output that shows
- a traceback (an error output, or "Traceback (most recent call last)" in a stream) or a warning (a `...Warning`
  in any stream, or a stderr line that says warning, error, failed or exception);
- a bare boolean (an execute_result or display_data whose whole text is `True` or `False`): it reads as a verdict;
- an absolute path of this machine (the project root, the runs folder, the home and temp folders given, or any path
  under /tmp, /home, /root, /Users, /var, /private, /mnt, /opt, /srv or a Windows user folder);
- a URL whose query string carries a token or key (`token=`, `write_token=`, `key=`, `api_key=`, ...); the value
  is hidden in the message;
- a float with more than 4 decimals in a table (cells of an HTML table, or the text/plain of a DataFrame output).

Widgets are read too: the saved widget state of every widget a cell displays (its strings) is checked for paths,
tokens and table floats. A cell is numbered as in the source notebook: papermill's injected-parameters cell is not
counted. Each offence names the notebook, the cell number, the cell's last line and the offending text.
"""

from __future__ import annotations

import html
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import nbformat

TRACEBACK = "traceback"
WARNING = "warning"
BARE_BOOLEAN = "bare boolean"
MACHINE_PATH = "machine path"
TOKEN_URL = "token in a URL"
LONG_FLOAT = "float with more than 4 decimals in a table"

_WARNING_CLASS = re.compile(r"\b[A-Z]\w*Warning\b")  # UserWarning, FutureWarning, ... wherever it is printed
_STDERR_TROUBLE = re.compile(r"(?i)warn|error|fail|exception|traceback")
_TRACEBACK = "Traceback (most recent call last)"
_BOOLEAN = re.compile(r"(np\.)?(True|False)_?")
_GENERIC_PATH = re.compile(
    r"(?<![\w.~-])(?:/(?:tmp|home|root|Users|var|private|mnt|opt|srv)(?![\w.-])[^\s'\"<>,;)\]]*"
    r"|[A-Za-z]:\\(?:Users|Windows|Temp)\\[^\s'\"<>,;)\]]*)"
)
_QUERY = re.compile(r"[^\s'\"<>]*\?[^\s'\"<>]+")
_SECRET_PARAM = re.compile(r"(?i)(token|key|secret|password|signature|sig)$")
_LONG_FLOAT = re.compile(r"(?<![\w.])[-+]?\d+\.\d{5,}(?:[eE][-+]?\d+)?(?![\w.])")
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WIDGET_REF = re.compile(r"IPY_MODEL_(\w+)")
_SHOWN = 160  # characters of offending text in a message


@dataclass(frozen=True)
class Offence:
    notebook: str
    cell: int  # number in the source notebook (papermill's injected cell not counted)
    last_line: str  # the cell's last line of code (what printed or returned the output), to find the cell
    rule: str
    text: str  # the offending text, shortened; token values hidden

    def __str__(self) -> str:
        return f"{self.notebook} cell {self.cell} `{self.last_line}`: {self.rule}: {self.text}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


class _TableCells(HTMLParser):
    """The text of every <td> and <th> inside a <table>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[str] = []
        self._tables = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._tables += 1
        elif tag in ("td", "th") and self._tables:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._tables = max(0, self._tables - 1)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_cells(markup: str) -> list[str]:
    parser = _TableCells()
    parser.feed(markup)
    parser.close()
    return parser.cells


def long_floats(texts: Iterable[str]) -> list[str]:
    found: list[str] = []
    for text in texts:
        found += [m for m in _LONG_FLOAT.findall(text) if m not in found]
    return found


def machine_paths(text: str, prefixes: Iterable[str]) -> list[str]:
    """Absolute paths of this machine in `text`: under one of `prefixes`, or under a usual system folder."""
    found: list[str] = []
    for prefix in sorted(set(prefixes), key=len, reverse=True):
        for match in re.finditer(rf"(?<![\w.~-]){re.escape(prefix)}(?![\w.-])[^\s'\"<>,;)\]]*", text):
            if not any(match.group() in f for f in found):
                found.append(match.group())
    for match in _GENERIC_PATH.finditer(text):
        if not any(match.group() in f for f in found):
            found.append(match.group())
    return found


def token_urls(text: str) -> list[str]:
    """URLs (or bare query strings) with a token- or key-like parameter, the values replaced by `<hidden>`."""
    found = []
    for match in _QUERY.finditer(html.unescape(text)):
        url = match.group()
        query = url.split("?", 1)[1]
        secrets = [(k, v) for k, v in parse_qsl(query, keep_blank_values=False) if _SECRET_PARAM.search(k)]
        for name, value in secrets:
            url = url.replace(f"{name}={value}", f"{name}=<hidden>")
        if secrets:
            found.append(url)
    return found


def default_machine_paths() -> list[str]:
    """The project root, the runs folder, the home and temp folders of this machine."""
    from helpers import ROOT
    from helpers.runfolder import runs_dir

    return _variants([ROOT, runs_dir(), Path.home(), Path(tempfile.gettempdir())])


def _variants(paths: Iterable[str | Path]) -> list[str]:
    found: set[str] = set()
    for path in paths:
        for variant in (Path(path), Path(path).resolve()):
            if len(variant.parts) > 1:  # never "/" alone
                found.add(str(variant))
    return sorted(found)


def _texts(output: Any) -> Iterator[tuple[str, str]]:
    """(kind, text) of an output: stream name, "error", or a MIME type."""
    if output.output_type == "stream":
        yield output.name, output.text
    elif output.output_type == "error":
        yield "error", "\n".join([f"{output.ename}: {output.evalue}", *output.traceback])
    else:
        for kind, value in output.get("data", {}).items():
            if kind.startswith("text/") and isinstance(value, str):
                yield kind, value


def _widget_strings(nb: Any, model_id: str) -> list[str]:
    """Every string in the saved state of a widget and of the widgets it holds."""
    state = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    strings: list[str] = []
    seen: set[str] = set()
    todo = [model_id]
    while todo:
        current = todo.pop()
        if current in seen or current not in state:
            continue
        seen.add(current)
        values: list[Any] = [state[current].get("state", {})]
        while values:
            value = values.pop()
            if isinstance(value, dict):
                values += list(value.values())
            elif isinstance(value, list):
                values += value
            elif isinstance(value, str):
                todo += _WIDGET_REF.findall(value)
                if not _WIDGET_REF.fullmatch(value):
                    strings.append(value)
    return strings


def _output_offences(nb: Any, output: Any, prefixes: list[str]) -> Iterator[tuple[str, str]]:
    """(rule, offending text) for one output."""
    texts = list(_texts(output))
    if output.output_type == "error":
        yield TRACEBACK, f"{output.ename}: {output.evalue}"
    for kind, text in texts:
        if kind in ("stdout", "stderr"):
            trouble = _STDERR_TROUBLE if kind == "stderr" else _WARNING_CLASS
            lines = [line for line in text.splitlines() if trouble.search(line)]
            if _TRACEBACK in text:
                yield TRACEBACK, text[text.index(_TRACEBACK) :]
            elif lines:
                more = f" (and {len(lines) - 1} more line(s))" if len(lines) > 1 else ""
                yield WARNING, f"{kind}: {_short(lines[0])}{more}"
    data = output.get("data", {})
    plain = data.get("text/plain", "")
    if output.output_type in ("execute_result", "display_data") and _BOOLEAN.fullmatch(plain.strip()):
        if set(data) <= {"text/plain"}:
            yield BARE_BOOLEAN, plain.strip()
    if output.output_type != "error":  # a traceback is reported once, whatever it holds
        widget = data.get(_WIDGET_VIEW, {}).get("model_id")
        strings = _widget_strings(nb, widget) if widget else []
        for text in [t for _, t in texts] + strings:
            for path in machine_paths(html.unescape(text), prefixes):
                yield MACHINE_PATH, path
            for url in token_urls(text):
                yield TOKEN_URL, url
        markup = [data.get("text/html", "")] + [s for s in strings if "<table" in s]
        tables = [cell for m in markup if "<table" in m for cell in table_cells(m)]
        if "<table" in data.get("text/html", "") and plain:
            tables.append(plain)  # a DataFrame's text/plain is the same table
        if floats := long_floats(tables):
            more = f" (and {len(floats) - 5} more)" if len(floats) > 5 else ""
            yield LONG_FLOAT, ", ".join(floats[:5]) + more


def notebook_offences(path: Path, prefixes: Iterable[str | Path] | None = None) -> list[Offence]:
    """Every offence in the outputs of the executed notebook at `path`. `prefixes`: this machine's folders
    (default: `default_machine_paths()`)."""
    nb = nbformat.read(path, as_version=4)
    known = default_machine_paths() if prefixes is None else _variants(prefixes)
    offences: list[Offence] = []
    injected = 0
    for index, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.metadata.get("tags", []):
            injected += 1
            continue
        if cell.cell_type != "code":
            continue
        last_line = _short(next((line for line in reversed(cell.source.splitlines()) if line.strip()), ""))[:60]
        for output in cell.get("outputs", []):
            for rule, text in _output_offences(nb, output, known):
                offence = Offence(path.name, index - injected, last_line, rule, _short(text))
                if offence not in offences:
                    offences.append(offence)
    return offences


def folder_offences(folder: Path, prefixes: Iterable[str | Path] | None = None) -> list[Offence]:
    """Every offence in every executed notebook (`*.ipynb`) of `folder`, notebook by notebook."""
    return [o for path in sorted(folder.glob("*.ipynb")) for o in notebook_offences(path, prefixes)]


def report(offences: list[Offence]) -> str:
    """One line per offence, grouped by notebook."""
    lines: list[str] = []
    for notebook in sorted({o.notebook for o in offences}):
        mine = [o for o in offences if o.notebook == notebook]
        lines.append(f"{notebook}: {len(mine)} offence(s)")
        lines += [f"  cell {o.cell} `{o.last_line}`: {o.rule}: {o.text}" for o in mine]
    return "\n".join(lines)
