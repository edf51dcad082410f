"""A faster training loss for CPUs: only the answer positions go through the LM head.

Without Triton (on CPU), trl's fused LM head scores every position, prompt and padding included, over the whole
vocabulary, and again in the backward pass: half of a training step on the embedded model. On a GPU trl's own
fused head is the better one (it never builds the full logits), so `helpers.trainer.build_trainer` uses this
trainer only on CPU.
"""

from __future__ import annotations

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy whose backward writes softmax minus one-hot in place.

    PyTorch's own backward zero-fills a (positions x vocabulary) gradient, scatters into it and runs the log-softmax
    backward: three passes over ~25 M numbers per step on the embedded model. This is one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = logits.log_softmax(-1)
        ctx.save_for_backward(log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, targets = ctx.saved_tensors
        grad_logits = log_probs.exp_()  # the softmax, reusing the saved buffer (a step runs backward once)
        grad_logits[torch.arange(len(targets)), targets] -= 1
        return grad_logits.mul_(grad), None


def _hidden_through_wrapper(model: torch.nn.Module, decoder: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden state, computed by calling the outer (DistributedDataParallel) model.

    DDP averages gradients across processes only for a forward pass through its own wrapper: calling the inner
    decoder directly would leave each process training alone. So the whole model runs, scoring only the last
    position (`logits_to_keep=1`, cheap), and a hook on the decoder's final norm keeps its output.
    """
    captured: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


class AnswerHeadSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss sends only the answer positions through the LM head.

    Without Triton (on CPU), trl's fused LM head scores every position, prompt and padding included, over the whole
    vocabulary, and again in the backward pass: half of a training step on the embedded model. Projecting only the
    positions that carry a label gives the same loss and gradients in about two thirds of the time
    (benchmarks/train_throughput.py). Of trl's metrics it logs token accuracy and the token count; entropy, another
    pass over the whole vocabulary per position, is left out.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # only asked for when logits are wanted; keep trl's path for that
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if model.training else "eval"
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if is_peft_model(causal_lm) else causal_lm
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        if self.accelerator.num_processes > 1:
            hidden = _hidden_through_wrapper(model, causal_lm.base_model, model_inputs)
        else:
            hidden = causal_lm.base_model(**model_inputs, use_cache=False).last_hidden_state
        labels = inputs["labels"][:, 1:]
        answer = labels != -100
        targets = labels[answer]
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][answer]).float()
        count = num_items_in_batch if num_items_in_batch is not None else answer.sum().clamp(min=1)
        loss = _CrossEntropySum.apply(logits, targets) / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Like Trainer.compute_loss: `count` holds every process's answer tokens and DDP averages the gradients
            # across processes, so scale back up (1 on one process); without it 2 processes learn half as fast.
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            metrics = self._metrics[mode]
            metrics["mean_token_accuracy"].append((logits.argmax(-1) == targets).float().mean().item())
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
                # every process's tokens, as trl counts them, so tokens/s is the whole job's
                self._total_train_tokens += int(self.accelerator.gather(local.to(hidden.device)).sum())
            metrics["num_tokens"] = [self._total_train_tokens]
        return loss
