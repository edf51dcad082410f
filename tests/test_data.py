import json

import pytest

from helpers.data import (
    FIELDS,
    DataError,
    build_splits,
    check_end_of_turn_trained,
    fingerprint,
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
        ({k: v for k, v in ROW.items() if k != "response"}, "line 2: missing field.*response"),
        ({**ROW, "notes": "x"}, "line 2: unexpected field.*'notes'"),
        ({**ROW, "response": "   "}, "line 2: field 'response' is empty"),
        ({**ROW, "instruction": 7}, "line 2: field 'instruction' must be text, got int"),
        (["not", "an", "object"], "line 2: expected an object"),
        ({**ROW, "response": " " + ROW["response"].upper()}, "line 2: duplicate of .*line 1"),
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


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    latin1 = json.dumps({**ROW, "instruction": "caf\u00e9?"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(DataError, match=r"d.jsonl, line 2: not valid UTF-8"):
        load_rows(str(path))


def test_skip_policy_keeps_good_rows_and_counts_the_rest_by_reason(tmp_path):
    other = {**ROW, "instruction": "What is a pepper?"}
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, "{broken", {**ROW, "response": ""}, ROW, other, {"x": 1}])
    loaded = load_rows(path, on_error="skip")
    assert [r["instruction"] for r in loaded.rows] == [ROW["instruction"], other["instruction"]]
    assert loaded.rows[1]["where"].endswith("d.jsonl, line 5")
    assert loaded.skipped() == {"invalid JSON": 1, "empty text": 1, "duplicate": 1, "missing field": 1}
    with pytest.raises(DataError, match=r"no usable rows \(2 skipped"):
        load_rows(write_jsonl(tmp_path / "bad.jsonl", ["{", {"x": 1}]), on_error="skip")


def test_fingerprint_depends_on_content_only(sample_rows):
    assert fingerprint(sample_rows) == fingerprint([{**r, "where": "elsewhere"} for r in sample_rows])
    assert fingerprint(sample_rows) != fingerprint(sample_rows[1:])


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable rows"):
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
    assert stats["rows_dropped_too_long"] == len(stats["too_long"]) > 0
    assert all(r["over"] == r["tokens"] - 200 > 0 and "line" in r["where"] for r in stats["too_long"])
    assert stats["tokens_max"] <= 200
    assert len(splits["eval"]) == smoke.data.eval_rows
    assert stats["train_rows"] + stats["eval_rows"] == stats["rows_kept"]
    with pytest.raises(DataError, match="not enough for eval_rows"):
        build_splits(sample_rows, tokenizer, smoke.data, max_length=64)


def test_split_is_reproducible(sample_rows, tokenizer, smoke):
    first, _ = build_splits(sample_rows, tokenizer, smoke.data, 384)
    second, _ = build_splits(sample_rows, tokenizer, smoke.data, 384)
    assert first["eval"]["prompt"] == second["eval"]["prompt"]


def test_truncate_policy_shortens_answers_and_keeps_the_end_of_turn(sample_rows, tokenizer, smoke):
    settings = smoke.data.model_copy(update={"too_long": "truncate"})
    splits, stats = build_splits(sample_rows, tokenizer, settings, max_length=200)
    assert stats["rows_truncated"] == len(stats["too_long"]) > 0 and stats["rows_dropped_too_long"] == 0
    assert stats["rows_kept"] == min(len(sample_rows), smoke.data.max_rows) and stats["tokens_max"] <= 200
    eot_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for example in splits["train"]:
        check_end_of_turn_trained(tokenize_example(tokenizer, example)["labels"], eot_id, "truncated row")


# ---- adversarial inputs: each is a named problem or accepted, and nothing good is lost ---------------------------


def test_a_byte_order_mark_on_row_1_is_accepted_not_dropped(tmp_path):
    other = {**ROW, "instruction": "What is a pepper?"}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROW) + "\n" + json.dumps(other) + "\n").encode())
    for policy in ("stop", "skip"):
        loaded = load_rows(str(path), on_error=policy)
        assert [r["instruction"] for r in loaded.rows] == [ROW["instruction"], other["instruction"]]
        assert not loaded.problems
    as_list = tmp_path / "bom.json"
    as_list.write_bytes(b"\xef\xbb\xbf" + json.dumps([ROW, other]).encode())
    assert len(load_rows(str(as_list)).rows) == 2


def test_suffixes_are_case_insensitive(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = {**ROW, "instruction": "What is a pepper?"}
    write_jsonl(tmp_path / "UPPER.JSONL", [ROW, other])
    (tmp_path / "mixed.Json").write_text(json.dumps([ROW, other]))
    pq.write_table(pa.Table.from_pylist([ROW, other]), tmp_path / "rows.PARQUET")
    for name in ("UPPER.JSONL", "mixed.Json", "rows.PARQUET"):
        assert len(load_rows(str(tmp_path / name)).rows) == 2, name


def test_a_corrupt_parquet_is_a_named_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 100)
    with pytest.raises(DataError, match=r"broken.parquet: not a readable parquet file \("):
        load_rows(str(path))


def test_a_folder_is_reported_as_a_folder(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(DataError, match=r"data.jsonl is a folder, not a data file"):
        load_rows(str(tmp_path / "data.jsonl"))


def test_duplicate_keys_in_a_row_are_a_named_problem(tmp_path):
    other = {**ROW, "instruction": "What is a pepper?"}
    twice = '{"subject": "s", "system": "", "instruction": "Q?", "response": "harmless", "response": "evil"}'
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, twice, other])
    with pytest.raises(DataError, match=r"line 2: key\(s\) 'response' appear more than once; JSON would keep only"):
        load_rows(path)
    loaded = load_rows(path, on_error="skip")
    assert loaded.skipped() == {"duplicate key": 1} and len(loaded.rows) == 2
    (tmp_path / "d.json").write_text("[" + json.dumps(ROW) + "," + twice + "]")
    with pytest.raises(DataError, match=r"d.json, row 2: key\(s\) 'response' appear more than once"):
        load_rows(str(tmp_path / "d.json"))


def test_a_row_nested_past_the_parsers_limit_is_a_named_problem(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, "[" * 100_000 + "]" * 100_000])
    with pytest.raises(DataError, match=r"line 2: not usable JSON \(nested too deeply\)"):
        load_rows(path)
    assert len(load_rows(path, on_error="skip").rows) == 1


def test_a_hub_error_is_a_named_data_error_without_the_token(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    canary = "hf_canary_never_printed_1234"
    script = "from helpers.data import load_rows\nload_rows('hub:nobody-llm-school/no-such-dataset')"
    env = {**os.environ, "HF_TOKEN": canary, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "helpers.data.DataError: hub:nobody-llm-school/no-such-dataset: could not load the dataset" in result.stderr
    assert canary not in result.stderr + result.stdout


def test_eval_data_honours_on_error_and_the_length_limit(tmp_path, smoke, tokenizer):
    from helpers.data import load_eval_examples

    long = {**ROW, "instruction": "What is a long answer?", "response": "word " * 2000}
    path = write_jsonl(tmp_path / "eval.jsonl", [ROW, "{broken", long])
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_eval_examples(path, smoke, tokenizer)
    skip = smoke.model_copy(update={"data": smoke.data.model_copy(update={"on_error": "skip"})})
    loaded = load_eval_examples(path, skip, tokenizer)
    assert [e["prompt"][-1]["content"] for e in loaded.examples] == [ROW["instruction"]]
    assert [p.reason for p in loaded.problems] == ["invalid JSON"]
    assert loaded.too_long[0]["action"] == "dropped" and loaded.too_long[0]["where"].endswith("line 3")
    assert loaded.summary() == "1 rows; skipped: {'invalid JSON': 1}; over max_length: {'dropped': 1}"
    truncate = skip.model_copy(update={"data": skip.data.model_copy(update={"too_long": "truncate"})})
    loaded = load_eval_examples(path, truncate, tokenizer)
    kept = loaded.examples[1]
    assert len(loaded.examples) == 2 and 0 < len(kept["completion"][0]["content"].split()) < 2000
    assert len(tokenize_example(tokenizer, kept)["input_ids"]) <= smoke.model.max_seq_length


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_numbers(tmp_path, constant):
    other = {**ROW, "instruction": "What is a pepper?"}
    row = json.dumps({**ROW, "chunk": 0})[:-1].replace('"chunk": 0', f'"chunk": {constant}') + "}"
    path = write_jsonl(tmp_path / "d.jsonl", [other, row])
    with pytest.raises(DataError, match=rf"d.jsonl, line 2: not usable JSON \({constant} is not a JSON number\)"):
        load_rows(path)
    (tmp_path / "d.json").write_text(f"[{json.dumps(other)}, {row}]")
    with pytest.raises(DataError, match=rf"d.json: not usable JSON \({constant} is not a JSON number\)"):
        load_rows(str(tmp_path / "d.json"))


def test_a_parquet_nan_is_a_named_problem(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = {**ROW, "instruction": "What is a pepper?", "chunk": 1.0}
    pq.write_table(pa.Table.from_pylist([other, {**ROW, "chunk": float("nan")}]), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet, row 2: field 'chunk' is nan, not a finite number"):
        load_rows(str(tmp_path / "rows.parquet"))


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\x1b", "\x00", "\x85"])
def test_bidi_overrides_and_control_characters_are_a_named_problem(tmp_path, char):
    other = {**ROW, "instruction": "What is a pepper?"}
    path = write_jsonl(tmp_path / "d.jsonl", [other, {**ROW, "response": f"Use {char}a salt."}])
    shown = f"\\\\u{ord(char):04x}"
    message = rf"line 2: field 'response' holds the invisible control character {shown} at position 4: it can make"
    with pytest.raises(DataError, match=message):
        load_rows(path)
    loaded = load_rows(path, on_error="skip")
    assert loaded.skipped() == {"control character": 1} and len(loaded.rows) == 1
    # tabs, line breaks and ordinary non-Latin text are no problem
    fine = {**ROW, "response": "Line one,\r\n\tline two: \u0645\u0644\u062d and \u00e9t\u00e9."}
    assert load_rows(write_jsonl(tmp_path / "ok.jsonl", [fine])).rows[0]["response"] == fine["response"]


def test_a_line_over_the_limit_is_refused_without_parsing_it(tmp_path, monkeypatch):
    import helpers.data

    other = {**ROW, "instruction": "What is a pepper?"}
    huge = json.dumps({**ROW, "response": "x" * 3_000_000})  # 3 MB: over the 1 MB limit
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, huge, other])
    parsed = []
    monkeypatch.setattr(helpers.data, "_loads", lambda text: parsed.append(len(text)) or json.loads(text))
    limit = r"3,000,\d+ bytes long, over the limit of 1,000,000 bytes for one row"
    with pytest.raises(DataError, match=rf"d.jsonl, line 2: {limit}"):
        load_rows(path)
    loaded = load_rows(path, on_error="skip")
    assert [r["where"][-6:] for r in loaded.rows] == ["line 1", "line 3"] and loaded.skipped() == {"line too long": 1}
    assert max(parsed) < 1_000  # the long line never reached the JSON parser


def test_a_line_just_under_the_limit_and_a_last_line_without_newline_are_read(tmp_path):
    from helpers.data import MAX_LINE_BYTES

    fill = MAX_LINE_BYTES - len(json.dumps({**ROW, "response": ""}))
    at_limit = json.dumps({**ROW, "response": "y" * fill})
    assert len(at_limit) == MAX_LINE_BYTES
    path = tmp_path / "d.jsonl"
    path.write_text(at_limit + "\r\n" + json.dumps({**ROW, "instruction": "What is a pepper?"}))
    assert len(load_rows(str(path)).rows) == 2
