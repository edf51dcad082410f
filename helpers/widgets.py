"""Widgets that let a learner touch what the model does (ipywidgets).

Each one is built by a function that returns the widget; nothing here waits for input, so a headless papermill run
passes straight through (the widget's state is saved in the executed notebook). `helpers.run` sets
LLM_SCHOOL_HEADLESS for its kernels, and the live loss chart then stays quiet instead of redrawing.
"""

from __future__ import annotations

import html
import json
import os
import threading
import time
from typing import Any

import ipywidgets as widgets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer, TrainerCallback

from helpers.data import to_prompt_completion, tokenize_example
from helpers.html_tables import show_controls
from helpers.inference import chat_inputs
from helpers.lora import count_lora_parameters
from helpers.plots import loss_curve
from helpers.profiles import LoraSettings

MASKED, TRAINED, END = "#9E9E9E", "#1B7F3B", "#C0392B"
PRE = "white-space:pre-wrap;word-break:normal;overflow-wrap:anywhere"  # wrap long lines between words


def headless() -> bool:
    """True in batch runs (helpers.run, tests) or outside a notebook kernel: no live redrawing there."""
    if os.environ.get("LLM_SCHOOL_HEADLESS"):
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    return not hasattr(get_ipython(), "kernel")  # None outside IPython; a terminal IPython has no kernel


# ---- 03: dataset browser --------------------------------------------------------------------------------------


def _shown(text: str) -> str:
    """Data text for HTML: escaped, and its control and bidi characters written out (\\u202e) so none reorders
    or hides what the row really holds."""
    return html.escape(show_controls(text))


def mask_html(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    """The example token by token: masked prompt grey, trained answer green, the end-of-turn token red and boxed."""
    eot_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    spans = []
    for token_id, label in zip(input_ids, labels, strict=True):
        text = _shown(tokenizer.decode([token_id]))
        if token_id == eot_id and label != -100:
            spans.append(f'<span title="end of turn: trained" style="color:{END};border:1px solid {END}">{text}</span>')
        else:
            color = MASKED if label == -100 else TRAINED
            spans.append(f'<span style="color:{color}">{text}</span>')
    return f'<pre style="{PRE};line-height:1.5">{"".join(spans)}</pre>'


def row_view(tokenizer: PreTrainedTokenizerBase, row: dict[str, str], max_length: int) -> dict[str, Any]:
    """What the browser shows for one row: raw JSON, chat-formatted text, coloured mask and token counts."""
    example = to_prompt_completion(row)
    tokens = tokenize_example(tokenizer, example)
    trained = sum(label != -100 for label in tokens["labels"])
    length = len(tokens["input_ids"])
    return {
        "raw": json.dumps(row, indent=2, ensure_ascii=False),
        "text": tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False),
        "mask": mask_html(tokenizer, tokens["input_ids"], tokens["labels"]),
        "summary": f"{length} tokens, {trained} trained (answer + end of turn), {length - trained} masked (prompt)"
        + (f"; over max_length {max_length} by {length - max_length}" if length > max_length else ""),
    }


def dataset_browser(rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> widgets.VBox:
    """Slide through the rows: raw row, formatted text and label mask, side by side in tabs."""
    slider = widgets.IntSlider(value=0, min=0, max=len(rows) - 1, description="row", continuous_update=False)
    summary = widgets.HTML()
    raw, text, mask = widgets.HTML(), widgets.HTML(), widgets.HTML()
    tabs = widgets.Tab(children=[mask, text, raw], titles=["label mask", "formatted text", "raw row"])
    legend = widgets.HTML(
        f'<span style="color:{MASKED}">masked prompt (no loss)</span> · <span style="color:{TRAINED}">trained '
        f'answer</span> · <span style="color:{END};border:1px solid {END}">end-of-turn token</span>'
    )

    def show(index: int) -> None:
        view = row_view(tokenizer, rows[index], max_length)
        summary.value = f"<b>{_shown(rows[index]['subject'])}</b>: {view['summary']}"
        mask.value = view["mask"]
        text.value = f'<pre style="{PRE}">{_shown(view["text"])}</pre>'
        raw.value = f'<pre style="{PRE}">{_shown(view["raw"])}</pre>'

    slider.observe(lambda change: show(change["new"]), names="value")
    show(0)
    box = widgets.VBox([slider, summary, legend, tabs])
    box.add_class("llm-school-dataset-browser")
    return box


# ---- 02: LoRA controls ----------------------------------------------------------------------------------------


def lora_estimate(model: PreTrainedModel, r: int, target_modules: list[str]) -> dict[str, float]:
    """Trainable LoRA parameters r * (in + out) over the targeted linear layers, and a training-memory estimate.

    Memory: the frozen base as loaded, plus 16 bytes per trainable weight (fp32 weight, gradient and Adam's two
    moments). Activations come on top and grow with batch size and sequence length.
    """
    trainable = count_lora_parameters(model, r, target_modules)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {
        "trainable": trainable,
        "share": trainable / total,
        "base_gib": base_bytes / 2**30,
        "lora_training_gib": 16 * trainable / 2**30,
    }


def linear_names(model: PreTrainedModel) -> list[str]:
    """Names of the linear layer kinds LoRA can target (q_proj, ...), without the output head."""
    found = {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head"
    }
    return sorted(found)


def lora_controls(model: PreTrainedModel, settings: LoraSettings) -> widgets.VBox:
    """Rank, alpha and target modules; the trainable count, share, scale and memory estimate follow live."""
    powers = {2**i for i in range(9)}  # 1 to 256, and the profile's own values
    rank = widgets.SelectionSlider(options=sorted(powers | {settings.r}), value=settings.r, description="r")
    alphas = sorted(powers | {settings.alpha})
    alpha = widgets.SelectionSlider(options=alphas, value=settings.alpha, description="alpha")
    targets = widgets.SelectMultiple(
        options=linear_names(model), value=tuple(settings.target_modules), description="targets", rows=7
    )
    result = widgets.HTML()

    def update(_: Any = None) -> None:
        est = lora_estimate(model, rank.value, list(targets.value))
        result.value = (
            f"<b>{est['trainable']:,}</b> trainable parameters ({est['share']:.2%} of the model) · "
            f"update scale alpha/r = {alpha.value / rank.value:g} · memory: base {est['base_gib']:.2f} GiB + "
            f"LoRA training state {est['lora_training_gib'] * 1024:.0f} MiB (+ activations)"
        )

    for control in (rank, alpha, targets):
        control.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox([widgets.VBox([rank, alpha]), targets]), result])
    box.add_class("llm-school-lora-controls")
    return box


# ---- 05: live loss chart ---------------------------------------------------------------------------------------


class LiveLossPlot(TrainerCallback):
    """Redraws a loss chart in place as the trainer logs (at most once a second); quiet in headless runs."""

    def __init__(self, eval_before: float | None = None, min_interval: float = 1.0) -> None:
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = [(0, eval_before)] if eval_before is not None else []
        self.min_interval = min_interval
        self._last_draw = 0.0
        self._handle: Any = None
        self._figure: Any = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval.append((state.global_step, float(logs["eval_loss"])))
        if not headless() and time.monotonic() - self._last_draw >= self.min_interval:
            self.draw()

    def on_train_end(self, args, state, control, **kwargs):
        if not headless():
            self.draw()

    def draw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        step = self.train[-1][0] if self.train else 0
        self._figure = loss_curve({"train": self.train, "eval": self.eval}, title=f"live: step {step}")
        plt.close(self._figure)  # shown through the display handle only, not again at the cell's end
        if self._handle is None:
            self._handle = display(self._figure, display_id=True)
        else:
            self._handle.update(self._figure)
        self._last_draw = time.monotonic()


# ---- 06: chat panel -------------------------------------------------------------------------------------------


class ChatPanel:
    """Type a question; the base model's and the tuned model's answers stream side by side."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, system: str, max_new_tokens: int) -> None:
        self.model, self.tokenizer, self.system, self.max_new_tokens = model, tokenizer, system, max_new_tokens
        self.question = widgets.Textarea(placeholder="Ask a security question", rows=2)
        self.question.layout.width = "100%"
        self.button = widgets.Button(description="Ask both", button_style="primary", icon="paper-plane")
        self.base = widgets.Textarea(placeholder="base model", rows=10)
        self.tuned = widgets.Textarea(placeholder="tuned model", rows=10)
        for answer in (self.base, self.tuned):
            answer.layout.width = "100%"
        self.status = widgets.HTML()
        self.button.on_click(lambda _: self.ask(self.question.value))
        columns = [
            widgets.VBox([widgets.HTML("<b>base</b> (adapter off)"), self.base], layout={"width": "50%"}),
            widgets.VBox([widgets.HTML("<b>tuned</b> (adapter on)"), self.tuned], layout={"width": "50%"}),
        ]
        self.widget = widgets.VBox([self.question, widgets.HBox([self.button, self.status]), widgets.HBox(columns)])
        self.widget.add_class("llm-school-chat-panel")

    def _stream(self, target: widgets.Textarea, adapter: bool) -> None:
        inputs = chat_inputs(self.model, self.tokenizer, self.question.value, self.system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            kwargs = {
                "max_new_tokens": self.max_new_tokens,
                "do_sample": False,
                "streamer": streamer,
                "pad_token_id": self.tokenizer.pad_token_id,
                "eos_token_id": self.tokenizer.eos_token_id,
            }
            with torch.inference_mode():
                if adapter:
                    self.model.generate(**inputs, **kwargs)
                else:
                    with self.model.disable_adapter():
                        self.model.generate(**inputs, **kwargs)

        thread = threading.Thread(target=run)
        thread.start()
        target.value = ""
        for piece in streamer:  # tokens arrive as they are generated
            target.value += piece
        thread.join()

    def ask(self, question: str) -> dict[str, str]:
        """Answer with both models (base first), streaming into the two boxes; returns the answers."""
        self.question.value = question.strip()
        if not self.question.value:
            self.status.value = "Type a question first."
            return {}
        self.button.disabled = True
        try:
            for target, adapter, name in ((self.base, False, "base"), (self.tuned, True, "tuned")):
                self.status.value = f"{name} model is answering..."
                self._stream(target, adapter)
            self.status.value = f"both answered: {html.escape(self.question.value)}"
        finally:
            self.button.disabled = False
        return {"base": self.base.value, "tuned": self.tuned.value}


def chat_panel(model: Any, tokenizer: PreTrainedTokenizerBase, system: str, max_new_tokens: int) -> ChatPanel:
    """The side-by-side chat panel; `panel.widget` is what to display, `panel.ask(question)` asks from code."""
    return ChatPanel(model, tokenizer, system, max_new_tokens)
