"""LoRA and the trainer on the real embedded model (a few rows, a couple of steps)."""

import math

import pytest
import torch
from datasets import Dataset, DatasetDict

from helpers.cpu_loss import AnswerHeadSFTTrainer, _CrossEntropySum
from helpers.data import DataError, to_prompt_completion, tokenize_example
from helpers.lora import add_lora, count_lora_parameters, count_parameters
from helpers.model import load_model
from helpers.profiles import load_profile
from helpers.trainer import build_trainer
from helpers.training_log import final_eval_loss, loss_history, train_figures


@pytest.fixture(scope="module")
def tiny(sample_rows):
    profile = load_profile("cpu-smoke", {"train": {"max_steps": 2, "eval_steps": None, "logging_steps": 1}})
    model, tokenizer, card = load_model(profile)
    rows = [r for r in sample_rows if len(r["response"]) < 700][:10]
    splits = DatasetDict(
        train=Dataset.from_list([to_prompt_completion(r) for r in rows[:8]]),
        eval=Dataset.from_list([to_prompt_completion(r) for r in rows[8:]]),
    )
    return profile, model, tokenizer, card, splits


def test_lora_count_matches_hand_count_and_is_small(tiny):
    profile, model, *_ = tiny
    predicted = count_lora_parameters(model, profile.lora.r, profile.lora.target_modules)
    peft_model = add_lora(model, profile)
    trainable, total = count_parameters(peft_model)
    assert trainable == predicted
    assert trainable / total < 0.02


def test_trainer_tokenises_like_the_lesson_and_trains(tiny, tmp_path):
    profile, model, tokenizer, card, splits = tiny
    trainer = build_trainer(model, tokenizer, splits, profile, tmp_path)
    ours = tokenize_example(tokenizer, splits["train"][0])
    assert trainer.train_dataset[0]["input_ids"] == ours["input_ids"]
    assert trainer.train_dataset[0]["labels"] == ours["labels"]
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    history = loss_history(trainer.state.log_history)
    assert len(history["train"]) >= 2 and all(math.isfinite(loss) for _, loss in history["train"])
    figures = train_figures(trainer.state.log_history)
    assert figures["train_tokens"] > 0 and figures["tokens_per_second"] > 0
    assert math.isfinite(before)


def test_final_eval_loss_is_the_trainers_own_last_evaluation(tiny, tmp_path):
    profile, model, tokenizer, card, splits = tiny
    evaluating = profile.model_copy(update={"train": profile.train.model_copy(update={"eval_steps": 2})})
    trainer = build_trainer(model, tokenizer, splits, evaluating, tmp_path)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert logged and logged[-1]["step"] == trainer.state.global_step == 2
    runs = []
    trainer.evaluate = lambda evaluate=trainer.evaluate: runs.append(1) or evaluate()
    assert final_eval_loss(trainer) == logged[-1]["eval_loss"] and not runs, "no second evaluation"
    assert final_eval_loss(trainer) == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)
    runs.clear()
    trainer.state.log_history = [e for e in trainer.state.log_history if "eval_loss" not in e]
    assert final_eval_loss(trainer) == pytest.approx(logged[-1]["eval_loss"], rel=1e-5) and runs == [1]


def test_trainer_refuses_rows_whose_end_would_be_cut(tiny, tmp_path):
    profile, model, tokenizer, card, splits = tiny
    short = load_profile("cpu-smoke", {"model": {"max_seq_length": 96}})
    with pytest.raises(DataError, match="end-of-turn token is not among the trained labels"):
        build_trainer(model, tokenizer, splits, short, tmp_path)


def test_cross_entropy_sum_matches_pytorch():
    logits = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 49, 7, 7, 12])
    ours = _CrossEntropySum.apply(logits, targets)
    (grad_ours,) = torch.autograd.grad(2.5 * ours, logits)
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (grad_reference,) = torch.autograd.grad(2.5 * reference, logits)
    assert torch.allclose(ours, reference) and torch.allclose(grad_ours, grad_reference)


def test_answer_head_loss_and_gradients_equal_the_models_own(tiny, tmp_path):
    profile, _, tokenizer, _, splits = tiny
    model = add_lora(load_model(profile)[0], profile)
    trainer = build_trainer(model, tokenizer, splits, profile, tmp_path)
    assert isinstance(trainer, AnswerHeadSFTTrainer)  # the CPU path
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and "attention_mask" in batch

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, ours_grads = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    # The model's own loss: the full logits of every position, cross-entropy over the labelled ones
    theirs, their_grads = loss_and_grads(lambda: model(**batch).loss)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ours_grads, their_grads, strict=True))


def test_train_figures_cover_the_resumed_part_of_a_resumed_run():
    before_kill = [{"num_tokens": 100, "loss": 3.0}, {"eval_runtime": 5.0}, {"num_tokens": 200, "loss": 2.9}]
    after_resume = [{"num_tokens": 90, "loss": 2.8}, {"eval_runtime": 3.0}, {"num_tokens": 180}, {"train_runtime": 23}]
    assert train_figures(before_kill + after_resume) == {
        "train_tokens": 180,
        "train_seconds": 20.0,
        "tokens_per_second": 9.0,
    }
    assert train_figures(before_kill + [{"train_runtime": 15}])["tokens_per_second"] == 20.0


def test_settings_table_shows_plain_values_the_passes_and_the_profiles_reasons(tiny, tmp_path):
    from enum import Enum

    from helpers.trainer import PASSES, key_settings, settings_table

    profile, model, tokenizer, card, splits = tiny
    chosen = {"learning_rate": 0.002, "lr_scheduler_type": "cosine", "max_steps": 1}
    why = {"learning_rate": "High on purpose.", "max_steps": "Short on purpose."}
    lab = profile.model_copy(update={"train": profile.train.model_copy(update={**chosen, "why": why})})
    trainer = build_trainer(model, tokenizer, splits, lab, tmp_path)
    settings = key_settings(trainer.args)
    assert (settings["lr_scheduler_type"], settings["optim"], settings["eval_strategy"]) == (
        "cosine",
        "adamw_torch",
        "no",
    )
    assert not any(isinstance(value, Enum) for value in settings.values()), "enums print as the profile's words"
    table = settings_table(trainer, lab)
    reason = table[f"profile {profile.name}"]
    assert reason["learning_rate"] == "Above the usual range. High on purpose."
    # 1 step x 4 rows over 8 training rows: half a pass, below the usual range, with max_steps' reason beside it
    assert table.loc[PASSES, "this run"] == "0.5 (4 rows seen, 8 training rows)"
    assert reason[PASSES] == "Below the usual range. Short on purpose." and reason["max_steps"] == ""
    assert reason["per_device_train_batch_size"] == "" and "1e-4 to 1e-3" in table.loc["learning_rate"].iloc[1]


def test_the_progress_table_rounds_its_figures_and_shows_none_before_training(monkeypatch):
    from types import SimpleNamespace

    from transformers.trainer_callback import TrainerControl, TrainerState
    from transformers.utils import notebook

    from helpers.training_log import TidyProgressCallback, _TidyTracker

    tracker = _TidyTracker(4, ["Step", "Training Loss"])
    tracker.write_line({"Step": 2, "Training Loss": 4.372237, "Num Tokens": 1450.0})
    assert tracker.inner_table[1] == [2, "4.3722", 1450]
    shown = []
    monkeypatch.setattr(notebook.disp, "display", lambda *args, **kwargs: shown.append(args))
    args, state = SimpleNamespace(eval_strategy="steps"), TrainerState()  # all the callback reads of the arguments
    metrics = {"eval_loss": 3.966204, "eval_runtime": 1.0}
    TidyProgressCallback().on_evaluate(args, state, TrainerControl(), metrics=metrics)
    assert shown == [] and metrics == {"eval_loss": 3.966204, "eval_runtime": 1.0}
    notebook.NotebookProgressCallback().on_evaluate(args, state, TrainerControl(), metrics=dict(metrics))
    assert "No log" in shown[0][0].data, "transformers' own callback would show 'Training Loss: No log'"
