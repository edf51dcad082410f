"""Lesson 09: how much GPU memory fine-tuning takes per GPU, and what DDP, FSDP and DeepSpeed ZeRO share out.

A back-of-the-envelope calculator (every term is a formula below, so a learner can check it by hand) for the
Llama 3.1 shapes the course names (8B, 70B, 405B), built from their published configurations: this machine cannot
reach the Hub, where `accelerate estimate-memory` reads them, so `accelerate_estimate` runs accelerate's own
counting on an empty model built here from the same configurations.

Bytes per parameter (mixed precision with Adam; the ZeRO paper's accounting):
- full fine-tuning: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, Adam's two moments) = 16;
- LoRA: the frozen base in bf16 (2), the adapters in fp32 (4 weights + 4 gradients + 8 Adam) = 16 per adapter weight;
- QLoRA: the frozen linear layers in 4-bit NF4 (0.5 + ~0.0156 of double-quantised scales), embeddings and LM head
  kept in bf16, the adapters as in LoRA.

What each engine shares out over N GPUs (the rest is a full copy on every GPU):
- DDP: nothing; every GPU holds everything and they average gradients.
- ZeRO-1: the optimizer state. ZeRO-2 and FSDP SHARD_GRAD_OP: optimizer state and gradients.
- ZeRO-3 and FSDP FULL_SHARD (FSDP2's default): weights too; a layer is gathered whole just before it runs.
- CPU offload: the optimizer state (ZeRO-3: the weights as well) lives in CPU RAM instead of GPU memory.
Activations are never shared out: each GPU keeps those of its own micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

GIB = 1024**3

# Llama 3.1's published configurations (config.json of meta-llama/Llama-3.1-{8B,70B,405B}); 128k vocabulary.
_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA31: dict[str, dict[str, Any]] = {
    "8B": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_parameters": _ROPE},
    "70B": {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_parameters": _ROPE},
    "405B": {"vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
             "num_attention_heads": 128, "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_parameters": _ROPE},
}  # fmt: skip
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Method = Literal["full", "lora", "qlora"]
Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp_grad_op", "fsdp_full"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
STRATEGIES: dict[str, str] = {
    "ddp": "DDP (replicated)",
    "zero1": "ZeRO-1 (optimizer)",
    "zero2": "ZeRO-2 (+ gradients)",
    "fsdp_grad_op": "FSDP SHARD_GRAD_OP",
    "zero3": "ZeRO-3 (+ weights)",
    "fsdp_full": "FSDP FULL_SHARD",
}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit scale per 64 weights + an fp32 scale per 256 scales


def _shape(model: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(model, dict):
        return model
    if model not in LLAMA31:
        raise KeyError(f"Unknown model size {model!r}: choose one of {', '.join(LLAMA31)} or pass a config dict.")
    return LLAMA31[model]


def linear_shapes(model: str | dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder layer."""
    c = _shape(model)
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def parameter_counts(model: str | dict[str, Any]) -> dict[str, int]:
    """Parameters by kind: the decoder layers' linear weights, embeddings + LM head, norms; and the total."""
    c = _shape(model)
    layers, h, vocab = c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    linear = layers * sum(a * b for a, b in linear_shapes(c).values())
    embeddings = vocab * h * (1 if c["tie_word_embeddings"] else 2)
    norms = layers * 2 * h + h
    return {"linear": linear, "embeddings": embeddings, "norms": norms, "total": linear + embeddings + norms}


def lora_weights(r: int, layers: Iterable[tuple[int, int]]) -> int:
    """LoRA adds r * (in + out) weights per targeted linear layer of (in, out) features: A is r x in, B is out x r."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in layers)


def lora_parameters(model: str | dict[str, Any], r: int, targets: tuple[str, ...] = LINEAR) -> int:
    """LoRA's weights on every decoder layer of a Llama shape, for the targeted linear layers."""
    c = _shape(model)
    targeted = [shape for name, shape in linear_shapes(c).items() if name in targets]
    return c["num_hidden_layers"] * lora_weights(r, targeted)


def activation_bytes(model: str | dict[str, Any], batch: int, seq: int, checkpointing: bool = True) -> int:
    """Activations kept for the backward pass on one GPU, bf16, flash attention (no seq x seq scores).

    ~34 * seq * batch * hidden bytes per layer for a transformer layer (Korthikanti et al., 2022, without the
    attention-score term), scaled by the MLP width of Llama (intermediate / hidden vs GPT's 4); with gradient
    checkpointing only each layer's input (2 * seq * batch * hidden) is kept and one layer is recomputed at a time.
    Plus the fp32 logits of the loss (seq * batch * vocab * 4), which a 128k vocabulary makes large.
    """
    c = _shape(model)
    tokens, h, layers = batch * seq, c["hidden_size"], c["num_hidden_layers"]
    per_layer = tokens * h * (34 + 2 * 3 * (c["intermediate_size"] / h - 4))  # SwiGLU: 3 wide tensors, not 2
    kept = layers * 2 * tokens * h + per_layer if checkpointing else layers * per_layer
    return int(kept + tokens * c["vocab_size"] * 4)


@dataclass
class MemoryEstimate:
    model: str
    method: str
    strategy: str
    gpus: int
    offload: bool
    weights_gib: float
    trainable_gib: float  # adapters (LoRA) or nothing separate (full: counted in weights)
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float  # per GPU
    cpu_ram_gib: float  # per node's share moved to CPU RAM by offload (whole job / nodes not modelled: per GPU)
    trainable_parameters: int
    parameters: int

    def row(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    model: str | dict[str, Any],
    method: Method = "qlora",
    strategy: Strategy = "ddp",
    gpus: int = 1,
    offload: bool = False,
    r: int = 16,
    batch: int = 1,
    seq: int = 2048,
    checkpointing: bool = True,
) -> MemoryEstimate:
    """GiB per GPU for weights, trainable adapters, gradients, optimizer state and activations."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    counts = parameter_counts(model)
    if method == "full":
        trainable = counts["total"]
        frozen = 0.0
        weights, adapters, grads, optim = 2.0 * trainable, 0.0, 2.0 * trainable, 12.0 * trainable
    else:
        trainable = lora_parameters(model, r)
        if method == "lora":
            frozen = 2.0 * counts["total"]
        else:  # the linear layers in NF4; embeddings, LM head and norms stay bf16
            frozen = NF4_BYTES * counts["linear"] + 2.0 * (counts["embeddings"] + counts["norms"])
        weights, adapters, grads, optim = frozen, 4.0 * trainable, 4.0 * trainable, 8.0 * trainable
    n = gpus
    if strategy in ("zero1", "zero2", "zero3", "fsdp_grad_op", "fsdp_full"):
        optim /= n
    if strategy in ("zero2", "zero3", "fsdp_grad_op", "fsdp_full"):
        grads /= n
    gathered = 0.0
    if strategy in ("zero3", "fsdp_full"):
        weights, adapters = weights / n, adapters / n
        if n > 1:  # the running layer and the prefetched next one, gathered whole
            layer = counts["linear"] / _shape(model)["num_hidden_layers"]
            gathered = 2 * layer * (NF4_BYTES if method == "qlora" else 2.0)
    cpu = 0.0
    if offload:
        cpu += optim
        optim = 0.0
        if strategy in ("zero3", "fsdp_full"):
            cpu += weights
            weights = 0.0
    activations = activation_bytes(model, batch, seq, checkpointing)
    total = weights + gathered + adapters + grads + optim + activations
    return MemoryEstimate(
        model=model if isinstance(model, str) else "custom",
        method=method,
        strategy=strategy,
        gpus=gpus,
        offload=offload,
        weights_gib=round((weights + gathered) / GIB, 2),
        trainable_gib=round(adapters / GIB, 2),
        gradients_gib=round(grads / GIB, 2),
        optimizer_gib=round(optim / GIB, 2),
        activations_gib=round(activations / GIB, 2),
        total_gib=round(total / GIB, 2),
        cpu_ram_gib=round(cpu / GIB, 2),
        trainable_parameters=trainable,
        parameters=counts["total"],
    )


def memory_table(
    models: tuple[str, ...] = ("8B", "70B", "405B"),
    methods: tuple[str, ...] = METHODS,
    strategies: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3"),
    gpus: int = 8,
    offload: tuple[bool, ...] = (False, True),
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """One row per model x method x strategy x offload: GiB per GPU (rows as plain dicts for a DataFrame)."""
    rows = []
    for model in models:
        for method in methods:
            for strategy in strategies:
                for off in offload:
                    if off and strategy in ("ddp",):
                        continue  # offloading needs a ZeRO/FSDP optimizer; DDP has none
                    rows.append(estimate(model, method, strategy, gpus, off, **kwargs).row())  # type: ignore[arg-type]
    return rows


def empty_llama(model: str | dict[str, Any]) -> Any:
    """A Llama with the given shape on PyTorch's meta device: no memory, no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**_shape(model)))


def accelerate_estimate(model: str | dict[str, Any]) -> dict[str, float]:
    """What `accelerate estimate-memory` prints for this shape (its own functions, on an empty model built here):
    the float32 size, the largest layer, and its Adam training estimate (model + gradients + optimizer, GiB)."""
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    total_size, largest = calculate_maximum_sizes(empty_llama(model))
    training = estimate_training_usage(total_size, "float32")
    return {
        "parameters": total_size / 4,
        "float32_gib": total_size / GIB,
        "int4_gib": total_size / 8 / GIB,
        "largest_layer_gib": largest[0] / GIB,
        "training_adam_gib": (training["model"] + training["gradients"] + training["optimizer"]) / GIB,
    }


def memory_widget() -> Any:
    """Sliders and menus over `estimate`: model, method, engine, GPUs, offload, batch, sequence length."""
    import ipywidgets as widgets

    controls = {
        "model": widgets.Dropdown(options=list(LLAMA31), value="70B", description="Llama 3.1"),
        "method": widgets.Dropdown(options=list(METHODS), value="qlora", description="method"),
        "strategy": widgets.Dropdown(
            options=[(v, k) for k, v in STRATEGIES.items()], value="fsdp_full", description="engine"
        ),  # fmt: skip
        "gpus": widgets.IntSlider(value=4, min=1, max=64, description="GPUs"),
        "offload": widgets.Checkbox(value=False, description="CPU offload"),
        "batch": widgets.IntSlider(value=1, min=1, max=16, description="batch/GPU"),
        "seq": widgets.IntSlider(value=2048, min=256, max=16384, step=256, description="seq length"),
    }
    out = widgets.HTML()

    def update(_change: Any = None) -> None:
        e = estimate(**{name: c.value for name, c in controls.items()})
        parts = ("weights_gib", "trainable_gib", "gradients_gib", "optimizer_gib", "activations_gib")
        cells = "".join(f"<tr><td>{p.removesuffix('_gib')}</td><td>{getattr(e, p):.2f} GiB</td></tr>" for p in parts)
        out.value = (f"<table>{cells}<tr><td><b>per GPU</b></td><td><b>{e.total_gib:.2f} GiB</b></td></tr>"
                     f"<tr><td>CPU RAM (offload)</td><td>{e.cpu_ram_gib:.2f} GiB</td></tr></table>")  # fmt: skip

    for control in controls.values():
        control.observe(update, names="value")
    update()
    return widgets.VBox([*controls.values(), out])


def table_frame(rows: list[dict[str, Any]]) -> Any:
    """The memory table as a DataFrame: GiB per GPU, one row per model and method, one column per engine."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["engine"] = frame["strategy"].map(STRATEGIES) + frame["offload"].map({True: " + offload", False: ""})
    return frame.pivot_table(index=["model", "method"], columns="engine", values="total_gib", sort=False)
