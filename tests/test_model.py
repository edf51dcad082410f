import copy

import pytest

from helpers.backend import HardwareError, check_hardware, cuda_available, uses_unsloth
from helpers.model import ModelSourceError, end_of_turn_token, ensure_chat_template, prepare_tokenizer, resolve_model
from helpers.profiles import load_profile


def test_embedded_model_is_cached_as_safetensors():
    path = resolve_model("embedded")
    assert path.endswith("SmolLM2-135M-Instruct")
    assert any(p.endswith(".safetensors") for p in __import__("os").listdir(path))


def test_end_of_turn_is_im_end_and_generation_stops_there(tokenizer):
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token != tokenizer.eos_token


def test_base_tokenizer_without_template_gets_the_fallback(tokenizer):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    said = ensure_chat_template(base, "chatml")
    assert "fallback chatml" in said and "<|im_end|>" in said
    assert end_of_turn_token(base) == "<|im_end|>"
    text = base.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_fallback_needs_its_header_tokens(tokenizer):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    with pytest.raises(ValueError, match="start_header_id"):
        ensure_chat_template(base, "llama3")


def test_missing_local_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model("./no-such-model")
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only message")
def test_gpu_profile_on_cpu_stops_with_the_cpu_profiles_named():
    profile = load_profile("rtx4090")
    assert not uses_unsloth(profile), "Unsloth must never be chosen without CUDA"
    with pytest.raises(HardwareError, match="needs a CUDA GPU.*cpu-lab, cpu-smoke"):
        check_hardware(profile)


def test_cpu_profiles_use_transformers():
    for name in ("cpu-smoke", "cpu-lab"):
        profile = load_profile(name)
        check_hardware(profile)
        assert not uses_unsloth(profile)


def test_prepare_tokenizer_makes_end_of_turn_the_eos(tokenizer):
    base = copy.deepcopy(tokenizer)
    base.chat_template, base.eos_token = None, "<|endoftext|>"  # like a base model: EOS is end-of-text
    prepare_tokenizer(base, "chatml")
    assert base.eos_token == "<|im_end|>", "generation and the EOT check must use the end-of-turn token"


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only message")
def test_unsloth_backend_on_cpu_is_refused_not_imported():
    profile = load_profile("cpu-smoke", {"model": {"backend": "unsloth"}})
    assert not uses_unsloth(profile)
    with pytest.raises(HardwareError, match="needs a CUDA GPU"):
        check_hardware(profile)
