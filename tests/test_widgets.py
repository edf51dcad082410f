"""The lesson widgets, driven from code the way a click would drive them."""

import re

import pytest

from helpers.lora import add_lora, count_lora_parameters, count_parameters
from helpers.widgets import (
    ChatPanel,
    LiveLossPlot,
    dataset_browser,
    headless,
    lora_controls,
    lora_estimate,
    mask_html,
    row_view,
)


@pytest.fixture(scope="module")
def smoke_model(smoke):
    from helpers.model import load_model

    model, tokenizer, _ = load_model(smoke)
    return model, tokenizer


def test_mask_colours_prompt_answer_and_end_of_turn(tokenizer, sample_rows):
    from helpers.data import to_prompt_completion, tokenize_example

    tokens = tokenize_example(tokenizer, to_prompt_completion(sample_rows[0]))
    page = mask_html(tokenizer, tokens["input_ids"], tokens["labels"])
    masked = sum(label == -100 for label in tokens["labels"])
    assert page.count('style="color:#9E9E9E"') == masked
    assert page.count('title="end of turn: trained"') == 1
    assert page.count("<span") == len(tokens["input_ids"])


def test_row_view_counts_and_flags_rows_over_max_length(tokenizer, sample_rows):
    view = row_view(tokenizer, sample_rows[0], max_length=64)
    total, trained = map(int, re.match(r"(\d+) tokens, (\d+) trained", view["summary"]).groups())
    assert 0 < trained < total and f"over max_length 64 by {total - 64}" in view["summary"]
    assert '"instruction"' in view["raw"] and "<|im_start|>assistant" in view["text"]


def test_dataset_browser_follows_the_slider(tokenizer, sample_rows):
    browser = dataset_browser(sample_rows[:5], tokenizer, 384)
    slider, summary = browser.children[0], browser.children[1]
    assert sample_rows[0]["subject"] in summary.value
    slider.value = 3
    assert sample_rows[3]["subject"] in summary.value
    mask = browser.children[3].children[0]
    assert row_view(tokenizer, sample_rows[3], 384)["mask"] == mask.value


def test_lora_estimate_matches_the_hand_count_and_peft(smoke, smoke_model):
    import copy

    model, _ = smoke_model
    targets = list(smoke.lora.target_modules)
    assert lora_estimate(model, smoke.lora.r, targets)["trainable"] == count_lora_parameters(
        model, smoke.lora.r, targets
    )
    wrapped = add_lora(copy.deepcopy(model), smoke)
    assert lora_estimate(wrapped, smoke.lora.r, targets)["trainable"] == count_parameters(wrapped)[0]
    assert lora_estimate(model, 2 * smoke.lora.r, targets)["trainable"] == 2 * count_lora_parameters(
        model, smoke.lora.r, targets
    )


def test_lora_controls_update_live(smoke, smoke_model):
    model, _ = smoke_model
    box = lora_controls(model, smoke.lora)
    (rank, alpha), targets = box.children[0].children[0].children, box.children[0].children[1]
    result = box.children[1]
    rank.value = 32
    assert f"{lora_estimate(model, 32, list(targets.value))['trainable']:,}" in result.value
    targets.value = ("q_proj", "v_proj")
    assert f"{lora_estimate(model, 32, ['q_proj', 'v_proj'])['trainable']:,}" in result.value
    alpha.value = 64
    assert "alpha/r = 2" in result.value
    odd = lora_controls(model, smoke.lora.model_copy(update={"r": 12, "alpha": 24}))  # not powers of two
    assert "alpha/r = 2" in odd.children[1].value


def test_live_loss_plot_collects_quietly_when_headless(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("LLM_SCHOOL_HEADLESS", "1")
    assert headless()
    live = LiveLossPlot()
    for step, logs in [(0, {"eval_loss": 4.2}), (1, {"loss": 4.0}), (2, {"loss": 3.5}), (2, {"eval_loss": 3.9})]:
        live.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)
    assert live.train == [(1, 4.0), (2, 3.5)] and live.eval == [(0, 4.2), (2, 3.9)]
    assert live._figure is None, "no drawing in a headless run"
    live.draw()  # what a notebook kernel does: one figure, redrawn in place
    lines = live._figure.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[4.0, 3.5], [4.2, 3.9]]


def test_chat_panel_streams_base_and_tuned_answers(smoke, smoke_model):
    import copy

    from helpers.inference import generate

    model, tokenizer = smoke_model
    tuned = add_lora(copy.deepcopy(model), smoke)
    panel = ChatPanel(tuned, tokenizer, system="", max_new_tokens=6)
    assert panel.ask("   ") == {} and "Type a question" in panel.status.value
    answers = panel.ask("What is a firewall?")
    with tuned.disable_adapter():
        expected = generate(tuned, tokenizer, "What is a firewall?", "", 6)["answer"]
    assert answers["base"].strip() == expected and answers["tuned"].strip()
    assert (
        panel.base.value == answers["base"]
        and panel.status.value == "both answered: What is a firewall?"
        and not panel.button.disabled
    )
