"""Model and data text shown as a table or a Markdown page reads as text: no markup, no hidden characters, whatever
the type of the cell (pandas' own `escape="html"` passes cells that are not strings through untouched)."""

import pandas as pd
import pytest

from helpers.html_tables import markdown_text, safe_table

PAYLOAD = "<img src=x onerror=alert(1)>"
BIDI = "\u202e"  # right-to-left override: the text after it displays reversed


def _assert_inert(page: str) -> None:
    assert "<img" not in page and "<script" not in page and BIDI not in page, page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_safe_table_escapes_every_cell_header_and_label_whatever_its_type():
    frame = pd.DataFrame(
        {
            PAYLOAD: ["plain", "two"],
            "first divergence": [{"token": PAYLOAD, "position": 3}, None],  # a dict cell: skipped by escape="html"
            "tokens": [[PAYLOAD, "<script>x</script>"], float("nan")],
            "flipped": [f"{BIDI}gpj.exe", 1.5],
        },
        index=[PAYLOAD, "b"],
    )
    page = safe_table(frame).to_html()
    _assert_inert(page)
    assert page.count("&lt;img src=x") == 4  # header, index label, dict cell, list cell
    assert "\\u202egpj.exe" in page and "&lt;script&gt;x&lt;/script&gt;" in page and ">1.5<" in page
    assert "nan" not in page.lower().replace("onerror", "")  # missing values are empty cells


def test_safe_table_takes_rows_as_dicts():
    page = safe_table([{"answer": PAYLOAD, "detail": {"why": PAYLOAD}}]).to_html()
    _assert_inert(page)


def test_answers_table_escapes_cells_that_are_not_text_and_hidden_characters():
    from helpers.inference import answers_table

    answer = {"answer": f"{BIDI}<script>alert(1)</script>", "stopped_by_itself": True}
    sample = {"question": "q?", "reference": {"text": PAYLOAD}, "base": answer, "tuned": answer}
    page = answers_table([sample]).to_html()
    _assert_inert(page)
    assert "\\u202e&lt;script&gt;" in page


def _report(subject: str, text: str) -> dict:
    scores = {"rougeL": 0.2, "bleu": 1.0, "chrf": 10.0, "token_f1": 0.3, "loop_rate": 0.0}
    change = {"base": 1.0, "tuned": 2.0, "change": 1.0, "low": 0.5, "high": 1.5, "tuned_better": "yes"}
    return {
        "model": text,
        "profile": "cpu-smoke",
        "dataset": text,
        "eval_rows": 2,
        "loss": {
            "base": {"loss": 2.0, "perplexity": 7.4},
            "tuned": {"loss": 1.5, "perplexity": 4.5},
            "relative_change": -0.25,
            "interval": {**change, "change": -0.25, "low": -0.3, "high": -0.2},
            "per_subject": {subject: {"rows": 2, "base": 2.0, "tuned": 1.5}, "Networking": {"rows": 1, "base": 2.1,
                                                                                             "tuned": 1.7}},
        },
        "generation": {
            "questions": 2,
            "decoding": {},
            "scores": {"reference_mean_tokens": 40.0},
            "changes": {"rougeL": change},
            "samples": [{"subject": subject, "question": text, "reference": text, "base": {"answer": text},
                         "tuned": {"answer": text}}],
        },
        "forgetting": {"loss": {"base": {"loss": 2.0}, "tuned": {"loss": 2.1}},
                       "scores": {"base": scores, "tuned": scores}},
    }  # fmt: skip


@pytest.mark.parametrize("subject", [PAYLOAD, "Web | XSS\n# not a heading", f"{BIDI}txt.exe"])
def test_report_markdown_escapes_subjects_answers_and_names(subject):
    from helpers.evaluation import report_markdown

    text = f"{PAYLOAD} [click](javascript:alert(1)) ![track](http://x.example/p.png) a|b\n## injected"
    page = report_markdown(_report(subject, text))
    assert "<img" not in page and BIDI not in page and "](" not in page.replace("\\](", ""), page
    assert "\n## injected" not in page and "\n# not a heading" not in page
    table = page.split("## Per subject (answer loss)")[1].split("\n\n")[1].splitlines()
    assert len(table) == 4 and all(row.replace("\\|", "").count("|") == 5 for row in table), table
    assert table[2].startswith(f"| {markdown_text(subject)} | 2 |")


def test_markdown_text_keeps_the_text_readable():
    assert markdown_text("SQL_injection & XSS: 1 < 2") == "SQL\\_injection &amp; XSS: 1 &lt; 2"
    assert markdown_text("line one\nline two") == "line one<br>line two"
