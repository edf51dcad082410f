"""Notebook 00's first step: raw documents cleaned and cut into chunks (helpers.documents)."""

import time
from pathlib import Path

import pytest

from helpers.data import DataError
from helpers.documents import MAX_DOCUMENT_BYTES, chunk_text, clean_text, read_documents

HTML = """<html><head><title>T</title><script>track()</script><meta name="author" content="x"></head><body>
<nav><a href="/">Home</a> | <a href="/a">About</a></nav><article><h1>Phishing review</h1>
<p>The attacker registered a look-alike domain and sent fake invoices to the finance team, who entered their
passwords on a copied login page. See <a href="https://example.com/report">the full report</a> for details.</p>
<p>Revoking every session of the account is what cut the attacker off, because session tokens outlive a reset of
the password. The team then removed the hidden inbox rule and blocked the domain at the gateway.</p>
</article><footer>Copyright. <a href="/privacy">Privacy</a></footer></body></html>"""


def test_clean_html_keeps_the_article_and_drops_navigation_scripts_and_links():
    text = clean_text(HTML, ".html")
    assert "look-alike domain" in text and "the full report" in text and "session tokens" in text
    for gone in ("track()", "Home | About", "https://", "Privacy", "<p>"):
        assert gone not in text


def test_clean_markdown_drops_front_matter_link_targets_images_and_metadata():
    raw = "---\ntitle: X\nowner: y\n---\n# Policy\n\nUse [FIDO2 keys](https://x.io/k) ![logo](l.png) now.\n\n"
    raw += "Source: https://wiki.example.com/page\n\nSecond   paragraph\nwrapped.\n"
    assert clean_text(raw, ".md") == "Policy\n\nUse FIDO2 keys now.\n\nSecond paragraph wrapped."


def test_chunks_keep_whole_paragraphs_under_the_limit():
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(40)) for p in range(5))
    chunks = chunk_text(text, 100)
    assert [len(c.split()) for c in chunks] == [80, 80, 40]
    assert chunk_text("x " * 250, 100) == ["x " * 99 + "x"] * 2 + ["x " * 49 + "x"]


def test_bad_documents_are_counted_not_fatal_and_an_empty_folder_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "good.md").write_text("Passphrases of four unrelated words resist guessing.\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x00\x00binary")
    (tmp_path / "locked.txt").write_text("secret")
    (tmp_path / "sheet.xlsx").write_bytes(b"PK")
    real_read = Path.read_bytes

    def read_bytes(path):
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    chunks, problems, documents = read_documents(tmp_path, 300)
    assert documents == 1 and len(chunks) == 1 and chunks[0].source == "good.md"
    assert sorted(p.reason for p in problems) == ["binary", "unreadable", "unsupported type"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="No usable documents"):
        read_documents(empty, 300)
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope", 300)


ADVERSARIAL = {
    "open brackets": "[" * 1_000_000,
    "unclosed links": "[a](" * 250_000,
    "unclosed images": "![" * 500_000,
    "links without targets": "[a]" * 333_333,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_link_cleaning_is_linear_on_a_1mb_adversarial_document(name, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "evil.md").write_text(ADVERSARIAL[name] + "\n\nPassphrases beat short passwords.\n")
    start = time.perf_counter()
    chunks, problems, documents_read = read_documents(raw, 300)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"{name}: {seconds:.2f} s"
    assert documents_read == 1 and not problems and "Passphrases beat short passwords." in chunks[-1].text
    # ordinary links still lose their targets; a link whose text holds brackets is left as written
    assert clean_text("See [the report](https://x.example/r) and ![logo](l.png), [a [b] c](u).", ".md") == (
        "See the report and , [a [b] c](u)."
    )


def test_a_document_over_the_size_limit_is_skipped_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "book.txt").write_bytes(b"word " * (MAX_DOCUMENT_BYTES // 5 + 1))
    (raw / "note.md").write_text("Passphrases beat short passwords.\n")
    chunks, problems, documents_read = read_documents(raw, 300)
    assert documents_read == 1 and [c.source for c in chunks] == ["note.md"]
    assert [(p.where, p.reason) for p in problems] == [("book.txt", "too large")]
    size = MAX_DOCUMENT_BYTES + 5
    assert str(problems[0]) == f"book.txt: {size:,} bytes, over the limit of 2,000,000 bytes; split it"
