import json

import pytest

from helpers.data import (
    FIELDS,
    DataError,
    build_splits,
    check_end_of_turn_trained,
    load_rows,
    show_label_mask,
    to_prompt_completion,
    tokenize_example,
)

ROW = {
    "subject": "Cryptography",
    "system": "You are a security expert.",
    "instruction": "What is a salt?",
    "response": "A random value stored with each password hash.",
}


def test_shipped_sample_is_large_varied_and_valid(sample_rows):
    assert len(sample_rows) >= 200
    assert len({r["subject"] for r in sample_rows}) >= 10
    assert len({r["instruction"] for r in sample_rows}) == len(sample_rows), "no duplicate questions"
    words = sorted(len(r["response"].split()) for r in sample_rows)
    assert words[0] >= 40 and words[len(words) // 2] >= 80, "responses of several sentences"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({k: v for k, v in ROW.items() if k != "response"}, "row 2: missing field.*response"),
        ({**ROW, "response": "   "}, "row 2: field 'response' is empty"),
        ({**ROW, "instruction": 7}, "row 2: field 'instruction' must be text, got int"),
        (["not", "an", "object"], "row 2: expected an object"),
    ],
)
def test_bad_rows_are_named_by_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, row])
    with pytest.raises(DataError, match=message):
        load_rows(path)


def test_broken_jsonl_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, '{"subject": "x", '])
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not valid JSON"):
        load_rows(path)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_hub_source_without_token_says_how_to_get_access(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DataError, match="gated.*HF_TOKEN"):
        load_rows("hub:WhiteRabbitNeo/WRN-Chapter-1")


def test_prompt_completion_shape():
    example = to_prompt_completion(ROW)
    assert [m["role"] for m in example["prompt"]] == ["system", "user"]
    assert example["completion"] == [{"role": "assistant", "content": ROW["response"]}]
    assert set(FIELDS) - {"system", "instruction", "response"} == {"subject"}


def test_mask_covers_the_prompt_and_trains_the_answer_and_end_of_turn(tokenizer):
    tokens = tokenize_example(tokenizer, to_prompt_completion(ROW))
    labels, ids = tokens["labels"], tokens["input_ids"]
    start = next(i for i, t in enumerate(labels) if t != -100)
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[start:]).startswith(ROW["response"])
    assert tokenizer.eos_token == "<|im_end|>"
    check_end_of_turn_trained(labels, tokenizer.eos_token_id, "row")
    assert show_label_mask(tokenizer, ids, labels).startswith("[<|im_start|>system")


def test_end_of_turn_check_catches_a_cut_answer(tokenizer):
    tokens = tokenize_example(tokenizer, to_prompt_completion(ROW))
    cut = tokens["labels"][:-3]  # as if max_length had truncated the end
    with pytest.raises(DataError, match="row 5.*end-of-turn token is not among the trained labels"):
        check_end_of_turn_trained(cut, tokenizer.eos_token_id, "row 5")
    with pytest.raises(DataError, match="prompt is not masked"):
        check_end_of_turn_trained(tokens["input_ids"], tokenizer.eos_token_id, "row 6")


def test_splits_drop_rows_longer_than_max_length(sample_rows, tokenizer, smoke):
    splits, stats = build_splits(sample_rows, tokenizer, smoke.data, max_length=200)
    assert stats["rows_dropped_too_long"] > 0
    assert stats["tokens_max"] <= 200
    assert len(splits["eval"]) == smoke.data.eval_rows
    assert stats["train_rows"] + stats["eval_rows"] == stats["rows_kept"]
    with pytest.raises(DataError, match="not enough for eval_rows"):
        build_splits(sample_rows, tokenizer, smoke.data, max_length=64)


def test_split_is_reproducible(sample_rows, tokenizer, smoke):
    first, _ = build_splits(sample_rows, tokenizer, smoke.data, 384)
    second, _ = build_splits(sample_rows, tokenizer, smoke.data, 384)
    assert first["eval"]["prompt"] == second["eval"]["prompt"]
