"""The GPU path, checked on CPU: profile choice, Unsloth dispatch (with a stand-in), the benchmark and bundle scripts.

`UnslothStandIn` below is not Unsloth: it records how the helpers call Unsloth's API and answers with the
transformers model, so the dispatch can be tested where Unsloth cannot import (no CUDA). The real Unsloth path
runs on a GPU machine: benchmarks/README.md.
"""

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import types
import zipfile

import pytest

from helpers import ROOT
from helpers.backend import HardwareError, check_hardware, cuda_available
from helpers.profiles import list_profiles, load_profile


class UnslothStandIn:
    """Stand-in for `unsloth.FastLanguageModel` (a test double, not Unsloth): records calls, loads with transformers."""

    calls: list[tuple[str, dict]] = []

    @classmethod
    def from_pretrained(cls, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cls.calls.append(("from_pretrained", kwargs))
        return AutoModelForCausalLM.from_pretrained(kwargs["model_name"]), AutoTokenizer.from_pretrained(
            kwargs["model_name"]
        )

    @classmethod
    def get_peft_model(cls, model, **kwargs):
        from peft import LoraConfig, get_peft_model

        cls.calls.append(("get_peft_model", kwargs))
        config = LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], target_modules=kwargs["target_modules"])
        return get_peft_model(model, config)

    @classmethod
    def for_inference(cls, model):
        cls.calls.append(("for_inference", {}))


@pytest.fixture
def fake_gpu_with_unsloth_stand_in(monkeypatch):
    """CUDA reported present and `unsloth` importable as the stand-in: the helpers take their GPU branch."""
    import helpers.backend

    module = types.ModuleType("unsloth")
    module.FastLanguageModel = UnslothStandIn
    monkeypatch.setitem(sys.modules, "unsloth", module)
    monkeypatch.setattr(helpers.backend, "cuda_available", lambda: True)
    UnslothStandIn.calls = []
    return UnslothStandIn


def test_gpu_profiles_validate_and_need_a_gpu():
    assert {"rtx4090", "gpu-80gb", "gpu-smoke"} <= set(list_profiles())
    for name in ["rtx4090", "gpu-80gb", "gpu-smoke"]:
        profile = load_profile(name)
        assert profile.model.requires_gpu, name
    big = load_profile("gpu-80gb")
    assert (
        not big.model.load_in_4bit
        and big.train.per_device_train_batch_size * big.train.gradient_accumulation_steps == 8
    )


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("name", ["gpu-80gb", "gpu-smoke"])
def test_every_gpu_profile_stops_on_cpu_naming_the_cpu_profiles(name):
    with pytest.raises(HardwareError, match="needs a CUDA GPU.*cpu-lab, cpu-smoke"):
        check_hardware(load_profile(name))


def test_relative_model_folder_is_found_from_the_project_folder(tmp_path, monkeypatch):
    from helpers.model import resolve_model

    monkeypatch.chdir(tmp_path)  # notebooks run in notebooks/, tests elsewhere: the path must not depend on it
    folder = ROOT / ".cache" / "test-relative-model"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / "config.json").write_text("{}")
        assert resolve_model(".cache/test-relative-model") == str(folder)
    finally:
        shutil.rmtree(folder)


def test_unsloth_dispatch_load_lora_and_inference(fake_gpu_with_unsloth_stand_in):
    from helpers.inference import prepare_for_inference
    from helpers.lora import add_lora
    from helpers.model import load_model

    profile = load_profile("cpu-smoke", {"model": {"backend": "unsloth", "load_in_4bit": True, "dtype": "auto"}})
    model, tokenizer, card = load_model(profile)
    name, kwargs = fake_gpu_with_unsloth_stand_in.calls[0]
    assert name == "from_pretrained" and card.backend == "unsloth"
    assert kwargs["load_in_4bit"] is True and kwargs["dtype"] is None and kwargs["max_seq_length"] == 384
    assert tokenizer.eos_token == "<|im_end|>", "the tokenizer Unsloth returns is prepared like any other"

    add_lora(model, profile)
    name, kwargs = fake_gpu_with_unsloth_stand_in.calls[1]
    assert name == "get_peft_model" and kwargs["use_gradient_checkpointing"] == "unsloth"
    assert kwargs["r"] == profile.lora.r and kwargs["target_modules"] == profile.lora.target_modules

    prepare_for_inference(model, profile)
    assert fake_gpu_with_unsloth_stand_in.calls[2][0] == "for_inference"


def test_start_lesson_imports_unsloth_before_transformers(tmp_path):
    """In a fresh process with CUDA reported present, the Unsloth stand-in package is imported before transformers."""
    package = tmp_path / "site" / "unsloth"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import sys\n# Stand-in for Unsloth (not Unsloth): records what was imported before it.\n"
        "BEFORE = sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules)\n"
    )
    code = textwrap.dedent("""
        import torch
        import bitsandbytes  # loaded before CUDA is faked: peft imports it, and its CUDA backend needs a real GPU
        torch.cuda.is_available = lambda: True
        from helpers.lesson import start_lesson
        start_lesson("gpu-smoke", "gpu-dispatch-test")
        import unsloth, transformers
        print("BEFORE", unsloth.BEFORE)
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "LLM_SCHOOL_RUNS": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BEFORE []" in done.stdout


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from helpers.model import EMBEDDED, resolve_model
    from tools.llama_shapes import build

    return build("tiny", tmp_path_factory.mktemp("models") / "tiny", resolve_model(EMBEDDED))


def test_llama_shapes_match_llama_31_8b():
    from tools.llama_shapes import parameter_count

    assert parameter_count("llama31-8b") == 8_030_261_248  # Llama 3.1 8B's published parameter count


def test_benchmark_worker_and_table_on_cpu(tiny_llama):
    """benchmarks/gpu_finetune.py's plain LoRA variant on CPU with the tiny shape: the code path, not the speed."""
    from benchmarks import gpu_finetune

    args = argparse.Namespace(
        worker="plain-lora",
        model_dir=str(tiny_llama),
        device="cpu",
        batch=1,
        seq=16,
        warmup=1,
        steps=1,
        r=4,
        shape="tiny",
    )
    row = gpu_finetune.worker(args)
    assert row["tokens_per_s"] > 0 and len(row["losses"]) == 2 and row["trainable"] > 0
    table = gpu_finetune.table([row, {"variant": "unsloth-qlora", "error": "CUDA out of memory"}], args)
    assert "| plain-lora |" in table and "failed: CUDA out of memory" in table and "| 2413 |" in table


def _wheel(path, files: dict[str, bytes], requires: list[str]):
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in {**files, "demo-1.0.dist-info/METADATA": meta.encode()}.items():
            zf.writestr(name, data)
        zf.writestr("demo-1.0.dist-info/RECORD", "stale\n")


def test_bundle_strips_wheels_and_keeps_their_record_true(tmp_path):
    from tools import gpu_bundle

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl"
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": bytes(1000) * 50 for v in ["cuda118", "cuda130", "cpu"]}
    _wheel(wheel, {**libs, "bitsandbytes/__init__.py": b"x = 1\n"}, [])
    assert gpu_bundle.slim(wheel, gpu_bundle.STRIP["bitsandbytes-"]) > 0
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = zf.read("demo-1.0.dist-info/RECORD").decode()
        init = zf.read("bitsandbytes/__init__.py")
    assert "bitsandbytes/libbitsandbytes_cuda118.so" not in names
    assert {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"} <= names
    digest = base64.urlsafe_b64encode(hashlib.sha256(init).digest()).rstrip(b"=").decode()
    assert f"bitsandbytes/__init__.py,sha256={digest},6" in record and "cuda118" not in record


def test_bundle_follows_only_requirements_that_apply_on_the_gpu_machine(tmp_path):
    from tools import gpu_bundle

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    _wheel(wheel, {}, ["tyro", 'mlx==0.32.4; sys_platform == "darwin"', 'rich; extra == "cli"', "torch<2.15.0,>=2.4.0"])
    assert [r.name for r in gpu_bundle.requirements(wheel)] == ["tyro", "torch"]
    assert "torch" in gpu_bundle.ON_DEVICE, "the GPU machine's own PyTorch must never be replaced by the bundle"
