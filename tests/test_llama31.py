"""The Llama 3.1 path without a GPU: Meta's tokenizer and chat turns, BOS once, <|eot_id|> trained and stopping,
padding apart from the end of turn, QLoRA in 4-bit on the CPU (profile cpu-llama31)."""

import math

import pytest
import torch
from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama3.chat_format import ChatFormat
from notebook_outputs import default_machine_paths, folder_offences, report

from helpers import chat
from helpers.backend import HardwareError, check_hardware
from helpers.data import to_prompt_completion, tokenize_example
from helpers.gguf_file import gguf_metadata
from helpers.inference import chat_inputs, generate_batch
from helpers.llama_twin import build_tokenizer, meta_tokenizer
from helpers.lora import add_lora
from helpers.model import end_of_turn_ids, load_model, pick_pad_token
from helpers.ollama import modelfile, ollama_template, render_ollama
from helpers.profiles import load_profile
from helpers.runfolder import RunFolder
from helpers.steps import CHAIN, EXPORT, MODEL, MODELFILE, TRAIN, executed_dir, gguf_name

BOS, END_OF_TEXT, PAD, EOM, EOT = 128000, 128001, 128004, 128008, 128009
SYSTEM, QUESTION, ANSWER = "Be precise.", "What is a SYN\tscan? (ünïcode 😀)", "A half-open TCP scan."


@pytest.fixture(scope="module")
def twin():
    """The cpu-llama31 profile's model, loaded as 05 loads it: NF4 with double quantisation, on the CPU."""
    profile = load_profile("cpu-llama31")
    model, tokenizer, card = load_model(profile)
    return profile, model, tokenizer


@pytest.fixture(scope="module")
def meta():
    return ChatFormat(meta_tokenizer())


def metas_dialog(meta: ChatFormat, answer: str | None = None) -> list[int]:
    """Meta's reference encoding (llama_models.llama3.chat_format) of the lesson's turns."""
    turns = [RawMessage(role="system", content=SYSTEM), RawMessage(role="user", content=QUESTION)]
    if answer is None:
        return list(meta.encode_dialog_prompt(turns).tokens)
    turns.append(RawMessage(role="assistant", content=answer, stop_reason=StopReason.end_of_turn))
    return [BOS] + [t for turn in turns for t in meta.encode_message(turn, None)[0]]


def test_twin_tokenizer_gives_metas_ids():
    tokenizer, reference = build_tokenizer(), meta_tokenizer()
    assert len(tokenizer) == 128256
    for text in ["Hello world", QUESTION, "tabs\tand\nnew lines  ", "SELECT * FROM users; -- '1'='1'"]:
        assert tokenizer(text)["input_ids"] == reference.encode(text, bos=True, eos=False), text
    assert tokenizer("Hello")["input_ids"] == [BOS, 9906]
    specials = {"<|begin_of_text|>": BOS, "<|finetune_right_pad_id|>": PAD, "<|eom_id|>": EOM, "<|eot_id|>": EOT}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in specials} == specials


def test_chat_turns_equal_metas_reference_encoder_with_bos_once(twin, meta):
    profile, _, tokenizer = twin
    assert chat.prompt_ids(tokenizer, QUESTION, SYSTEM) == metas_dialog(meta)
    row = to_prompt_completion({"system": SYSTEM, "instruction": QUESTION, "response": ANSWER, "subject": "scans"})
    trained = tokenize_example(tokenizer, row)
    assert trained["input_ids"] == metas_dialog(meta, ANSWER)
    assert trained["input_ids"].count(BOS) == 1
    assert trained["input_ids"][-1] == EOT and trained["labels"][-1] == EOT, "the end of turn is trained"


def test_pad_is_never_the_end_of_turn_and_generation_stops_there(twin):
    profile, model, tokenizer = twin
    assert tokenizer.eos_token_id == EOT and tokenizer.pad_token_id == PAD
    assert end_of_turn_ids(tokenizer) == [EOT, EOM, END_OF_TEXT]
    assert model.generation_config.eos_token_id == [EOT, EOM, END_OF_TEXT], "the base model's config stops at 128001"
    # The rule before this fix (pad = EOS = end of turn when a tokenizer has no pad) masked every answer's end.
    vocab = build_tokenizer().get_vocab()
    assert pick_pad_token(None, "<|eot_id|>", vocab) == "<|finetune_right_pad_id|>"
    assert pick_pad_token("<|eot_id|>", "<|eot_id|>", vocab) == "<|finetune_right_pad_id|>"
    assert pick_pad_token("<|endoftext|>", "<|im_end|>", vocab) == "<|endoftext|>"
    with pytest.raises(ValueError, match="No pad token other than the end-of-turn token <|eot_id|>"):
        pick_pad_token(None, "<|eot_id|>", {"<|eot_id|>", "hello"})


def test_generation_inputs_carry_one_bos(twin):
    profile, model, tokenizer = twin
    inputs = chat_inputs(model, tokenizer, QUESTION, SYSTEM)
    assert inputs["input_ids"][0].tolist().count(BOS) == 1
    seen = []
    real = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return real(**kwargs)

    model.generate = spy
    try:
        generate_batch(model, tokenizer, [QUESTION, "Short?"], SYSTEM, max_new_tokens=2)
    finally:
        del model.generate
    rows = seen[0].tolist()
    assert all(row.count(BOS) == 1 for row in rows), "left padding, then one BOS per prompt"


@pytest.mark.parametrize("family", ["llama31", "smollm2"])
def test_modelfile_prompt_tokenises_to_the_chat_templates_ids(family, twin, tokenizer):
    """Ollama renders the TEMPLATE and tokenises it adding BOS when the GGUF says add_bos_token: the ids must be the
    chat template's, with exactly one BOS (Llama 3.1) or none (SmolLM2's ChatML)."""
    tok = twin[2] if family == "llama31" else tokenizer
    template = ollama_template(tok)
    for system in (SYSTEM, "") if family == "llama31" else (SYSTEM,):  # SmolLM2's own default system: the SYSTEM line
        turns = chat.messages(QUESTION, system)
        served = tok(render_ollama(template, turns))["input_ids"]  # add_special_tokens: as the GGUF says
        assert served == chat.prompt_ids(tok, QUESTION, system), (family, system)
    if family == "llama31":
        assert not template.startswith("<|begin_of_text|>"), "llama.cpp and Ollama add BOS themselves"
        text = modelfile("model.gguf", tok, SYSTEM)
        assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|eom_id|>"' in text


def test_qlora_trains_on_the_cpu_in_4bit(twin, sample_rows):
    profile, model, tokenizer = twin
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    peft_model = add_lora(model, profile)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    example = tokenize_example(tokenizer, to_prompt_completion(sample_rows[0]))
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    peft_model.unload()


def test_an_evaluation_before_training_leaves_4bit_layers_trainable(twin):
    """bitsandbytes repacks a CPU 4-bit weight for an inference kernel without a backward after an eval-mode
    forward; 05 evaluates before it trains, so load_model turns that off. Gradients must reach the first layer."""
    profile, model, tokenizer = twin
    ids = torch.tensor([chat.prompt_ids(tokenizer, QUESTION, SYSTEM)])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0
    finally:
        embeddings.weight.requires_grad_(False)
        embeddings.weight.grad = None


def test_4bit_without_a_gpu_only_for_the_profile_that_opts_in():
    check_hardware(load_profile("cpu-llama31"))
    with pytest.raises(HardwareError, match="cpu_4bit"):
        check_hardware(load_profile("cpu-llama31", {"model": {"cpu_4bit": False}}))
    if not torch.cuda.is_available():
        with pytest.raises(HardwareError, match="needs a CUDA GPU"):
            check_hardware(load_profile("rtx4090"))


def test_lessons_01_to_09_run_on_the_llama31_twin(llama_chain):
    """The GPU profile's code path, executed: NF4 training, 4-bit loading in 06/07, merge, GGUF, serving, 09."""
    assert llama_chain.returncode == 0, llama_chain.output[-5000:]
    run = RunFolder(llama_chain.run_dir, "cpu-llama31")
    m = {step: run.require(step) for step in CHAIN[1:]}
    card = m[MODEL]["model"]
    assert card["quantization"] == "nf4" and card["end_of_turn"] == "<|eot_id|>" and card["device"] == "cpu"
    assert math.isfinite(m[TRAIN]["eval_loss_after"]) and m[TRAIN]["steps"] == 4
    gguf = gguf_metadata(run.path(EXPORT) / gguf_name("q8_0"))
    assert gguf["pre_tokenizer"] == "llama-bpe" and len(gguf["tokens"]) == 128256
    assert gguf["bos_token_id"] == BOS and gguf["add_bos_token"] is True and gguf["chat_template"]
    template = (run.path(EXPORT) / MODELFILE).read_text()
    assert "<|begin_of_text|>" not in template, "Ollama adds BOS from the GGUF: the template must not add a second"
    assert 'PARAMETER stop "<|eot_id|>"' in template and 'PARAMETER stop "<|eom_id|>"' in template
    export = m[EXPORT]
    assert export["served_prompt_tokens_match"], "llama.cpp's chat prompt has the notebook's ids: one BOS"
    f16 = export["teacher_forced"]["f16"]
    assert f16["positions_compared"] > 0 and f16["beyond_noise"] == 0
    assert abs(export["merged_vs_trained_loss_change"]) < 0.05, "NF4 + adapter (05-07) vs the merged model (08)"
    found = folder_offences(executed_dir(run), [*default_machine_paths(), llama_chain.run_dir.parent])
    assert not found, f"{len(found)} output(s) a learner should not see:\n{report(found)}"
