"""Model answers and data rows are untrusted text: shown in a notebook, they must read as text, never act as markup.

`safe_table` is the one way to show such text as a table: every cell (a dict, a number, None as much as a string)
and every header becomes text first, then HTML-escaped. pandas' own `escape="html"` leaves cells that are not
strings as they are, so a dict holding `<img src=x onerror=...>` would render as live HTML.

`markdown_text` does the same for a Markdown page (report.md): escaped for HTML, which Markdown viewers render,
and for Markdown, so a `[link](...)`, `![image](...)`, `|` or line break in a model's answer cannot add markup or
break the table it sits in.

`show_controls` makes invisible characters visible: bidi overrides (which make text read in another order than it
is stored, "Trojan Source") and control characters are written as `\\u202e` and the like.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from pandas.io.formats.style import Styler  # what safe_table returns: every cell formatted with escape="html"

# C0 controls but tab, newline and carriage return; DEL and C1 controls; bidi embeddings, overrides and isolates.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def show_controls(text: str) -> str:
    """`text` with each control or bidi character written out as an escape (`\\u202e`), so it is seen, not obeyed."""
    return CONTROL_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def cell_text(value: Any) -> str:
    """Any cell as the text a reader should see: None and NaN empty, containers as JSON, the rest as str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list, tuple)) else str(value)
    return show_controls(text)


def html_text(value: Any) -> str:
    """A cell's text, escaped for HTML (tags, quotes and ampersands as entities)."""
    return html.escape(cell_text(value))


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def markdown_text(value: Any) -> str:
    """A value as inline Markdown that shows exactly its text: HTML-escaped, Markdown punctuation backslash-escaped,
    line breaks as `<br>` (a new line could start a heading, list or quote, or end a table row)."""
    text = MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(cell_text(value)))
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def safe_table(data: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Styler:
    """A DataFrame, or rows as dicts, as an HTML-safe styled table: every cell, column name and index label is
    converted to text and escaped; text is left-aligned and keeps its line breaks."""
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data), columns=columns)
    text = frame.map(cell_text)
    text.columns = pd.Index([cell_text(c) for c in frame.columns])
    text.index = pd.Index([cell_text(i) for i in frame.index])
    styled = text.style.format(escape="html").format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    return styled.set_properties(**{"text-align": "left", "white-space": "pre-wrap"})
