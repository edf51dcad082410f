"""Reading the trainer's log (`trainer.state.log_history`): loss curves, tokens and time, and the notebook's
progress table."""

from __future__ import annotations

from typing import Any, cast

from transformers.utils.notebook import NotebookProgressCallback, NotebookTrainingTracker


def train_figures(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Real (non-padding) tokens trained on, training seconds (evaluations excluded) and tokens/s.

    After a resume the Trainer times only the resumed part and trl counts its tokens from zero again, so the
    figures cover that part.
    """
    seconds, eval_seconds, tokens = float("nan"), 0.0, 0
    for entry in log_history:
        if "train_runtime" in entry:
            seconds = entry["train_runtime"]
            break
        if entry.get("num_tokens", tokens) < tokens:  # the token counter restarted: a resumed run
            eval_seconds = 0.0
        tokens = int(entry.get("num_tokens", tokens))
        eval_seconds += entry.get("eval_runtime", 0.0)
    seconds -= eval_seconds
    return {"train_tokens": tokens, "train_seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1)}


def loss_history(
    log_history: list[dict[str, Any]], eval_before: float | None = None
) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs for training and evaluation from `trainer.state.log_history`.

    `eval_before`, the eval loss measured before `train()` (which resets the log), becomes step 0.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = sorted({e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e}.items())
    if eval_before is not None:
        evals.insert(0, (0, eval_before))
    return {"train": train, "eval": evals}


def final_eval_loss(trainer: Any) -> float:
    """The eval loss after the last step: the trainer's own, when it evaluated there (eval_steps divides max_steps),
    else a fresh `trainer.evaluate()` (about as long as one eval_steps evaluation)."""
    state = trainer.state
    logged = [e["eval_loss"] for e in state.log_history if "eval_loss" in e and e["step"] == state.global_step]
    return logged[-1] if logged else trainer.evaluate()["eval_loss"]


def _tidy(value: Any) -> Any:
    """A figure as the progress table shows it: whole numbers without decimals, others with 4."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else f"{value:.4f}"
    return value


class _TidyTracker(NotebookTrainingTracker):
    def write_line(self, values: dict[str, Any]) -> None:
        super().write_line({name: _tidy(value) for name, value in values.items()})


class TidyProgressCallback(NotebookProgressCallback):
    """transformers' notebook progress bar and table, with its figures rounded (4 decimals, token counts whole),
    and no table for an evaluation before training (it would read "Training Loss: No log"; the lesson prints the
    loss itself)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        built: Any = cast(Any, self).training_tracker  # the column names transformers chose
        self.training_tracker = _TidyTracker(state.max_steps, built.inner_table[0] if built.inner_table else None)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        if self.training_tracker is None:  # before train(): only the evaluation's own progress bar
            self.prediction_bar = None
            return
        super().on_evaluate(args, state, control, metrics=dict(metrics or {}), **kwargs)
