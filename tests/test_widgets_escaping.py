"""The dataset browser shows data rows as text: a `<script>` in a row must never become live HTML."""

from helpers.widgets import dataset_browser


def _html_values(widget) -> list[str]:
    """Every HTML string a widget tree shows (HTML widgets' values, recursively)."""
    import ipywidgets

    found = [widget.value] if isinstance(widget, ipywidgets.HTML) else []
    for child in getattr(widget, "children", ()):
        found += _html_values(child)
    return found


def test_dataset_browser_escapes_every_text_from_a_row(tokenizer):
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    row = {f: f"{payload} {f}" for f in ("subject", "system", "instruction", "response")}
    browser = dataset_browser([row, row], tokenizer, 384)
    shown = _html_values(browser)
    assert len(shown) >= 4 and all("<script" not in value and "<img" not in value for value in shown)
    page = "".join(shown)
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page  # the text, shown as text
    assert page.count("&lt;/script&gt;") >= 3  # summary subject, formatted text, raw row (mask splits tokens)


def test_dataset_browser_shows_bidi_overrides_and_control_characters_escaped(tokenizer):
    sneaky = "rm -rf \u202e/ txt.exe\u202c and \x1b[2J"
    row = {"subject": "sub\u2066ject", "system": "", "instruction": sneaky, "response": f"ok {sneaky}"}
    browser = dataset_browser([row, row], tokenizer, 384)
    page = "".join(_html_values(browser))
    assert not any(char in page for char in "\u202e\u202c\u2066\x1b"), "an invisible character reached the page"
    assert "\\u202e" in page and "\\u202c" in page and "sub\\u2066ject" in page and "\\u001b[2J" in page
