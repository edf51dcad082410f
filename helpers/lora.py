"""Lesson 02: wrap the model with LoRA adapters (PEFT), so only a small share of weights train."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from helpers.backend import uses_unsloth
from helpers.memory import lora_weights
from helpers.profiles import LoraSettings, Profile


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT LoraConfig for a profile's `lora` section."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: PreTrainedModel, profile: Profile, settings: LoraSettings | None = None) -> PeftModel:
    """Freeze the base model and add fresh LoRA adapters (Unsloth's own wrapper on its GPU path).

    `settings` replaces the profile's `lora` section (04 and 05 pass what notebook 02 saved).
    """
    settings = settings or profile.lora
    if uses_unsloth(profile):
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=profile.train.seed,
        )
    if profile.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(settings))


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """The base model with a trained adapter on top; `model.disable_adapter()` gives the base back."""
    return PeftModel.from_pretrained(model, str(adapter_dir))


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def count_lora_parameters(model: PreTrainedModel, r: int, target_modules: list[str]) -> int:
    """The weights LoRA of rank r adds to this model's targeted linear layers, plain or already wrapped by PEFT."""
    targeted = (
        (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if name.split(".")[-1] in target_modules and hasattr(module, "in_features")
    )
    return lora_weights(r, targeted)
