"""Lesson 09: how much GPU memory fine-tuning takes per GPU, and what DDP, FSDP and DeepSpeed ZeRO share out.

A back-of-the-envelope calculator (every term is a formula below, so a learner can check it by hand) for the
Llama 3.1 shapes the course names (8B, 70B, 405B), built from their published configurations: this machine cannot
reach the Hub, where `accelerate estimate-memory` reads them, so `accelerate_estimate` runs accelerate's own
counting on an empty model built here from the same configurations. `tests/test_memory.py` holds it to published
figures (the QLoRA paper, torchtune, Answer.AI) and to what transformers allocates for its loss.

Bytes per parameter (mixed precision with Adam; the ZeRO paper's accounting):
- full fine-tuning: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, Adam's two moments) = 16;
- LoRA: the frozen base in bf16 (2), the adapters in fp32 (4 weights + 4 gradients + 8 Adam) = 16 per adapter weight
  (`adapter_bytes` and `adam_bytes` change that: bf16 adapters, 8-bit or bf16 Adam states);
- QLoRA: the frozen linear layers in 4-bit NF4 (0.5 + ~0.0156 of double-quantised scales), embeddings and LM head
  kept in bf16, the adapters as in LoRA.

What each engine shares out over N GPUs (the rest is a full copy on every GPU):
- DDP: nothing; every GPU holds everything and they average gradients.
- ZeRO-1: the optimizer state. ZeRO-2 and FSDP SHARD_GRAD_OP: optimizer state and gradients.
- ZeRO-3 and FSDP FULL_SHARD (FSDP2's default): weights too; a layer is gathered whole just before it runs (the
  running layer and the prefetched next one are whole at any time). FSDP2 keeps the last unit whole from the end of
  the forward pass to the start of the backward pass (see `FsdpRoot`).
- CPU offload: the optimizer state and gradients (ZeRO-3 and FSDP: the weights as well) live in CPU RAM.
Activations are never shared out: each GPU keeps those of its own micro-batch. So is the loss over the vocabulary,
which a 128k vocabulary makes one of the largest terms (see `LOGIT_BYTES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
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
# Older shapes that published fine-tuning figures used (config.json of huggyllama/llama-65b, meta-llama/Llama-2-7b-hf
# and meta-llama/Llama-2-70b-hf).
LLAMA_65B: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 22016,
                             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 64,
                             "tie_word_embeddings": False}  # fmt: skip
LLAMA2_7B: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                             "tie_word_embeddings": False}  # fmt: skip
LLAMA2_70B: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
                              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                              "tie_word_embeddings": False}  # fmt: skip

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


# Bytes per token per vocabulary entry that the loss holds at its peak (the logits of one micro-batch):
# - "transformers": plain transformers (5.17, pinned): the LM head writes bf16 logits (2), `ForCausalLMLoss` upcasts
#   them to fp32 (`logits = logits.float()`, 4; transformers/loss/loss_utils.py) and cross-entropy keeps its fp32
#   log-softmax for the backward pass (4): 10 after the forward pass; the backward pass adds the fp32 gradient of the
#   log-probabilities while that copy is still held: 12 at the peak. Measured on a small Llama here (slope of the
#   peak over the vocabulary size; `logits_bytes_measured`, tests/test_memory.py): 10.25 forward, 12.25 peak.
#   Issues about this cost: huggingface/transformers#38452, QwenLM/Qwen3#570.
# - "upcast-in-forward": transformers of 2023-24 (the QLoRA paper's and Answer.AI's runs): LlamaForCausalLM.forward
#   itself ran `logits = logits.float()` and returned the fp32 logits in its output, and the loss took a contiguous
#   fp32 copy of the shifted logits; those operations measured here (`upcast_in_forward_bytes_measured`): 16.2.
# - "chunked": torchtune's CEWithChunkedOutputLoss compiled (its README's memory table uses torch.compile): the bf16
#   logits stay whole (2), the fp32 upcast and softmax happen one chunk of 8 at a time inside a fused kernel (not
#   measured here: that needs torch.compile's GPU kernels; torchtune's 7.4 GiB row in tests/test_memory.py checks it).
LOGIT_BYTES: dict[str, float] = {"transformers": 12.0, "upcast-in-forward": 16.0, "chunked": 2.0}
Loss = Literal["transformers", "upcast-in-forward", "chunked"]
# What FSDP keeps whole (unsharded) between the end of the forward pass and the start of the backward pass:
# - "head": accelerate 1.15 (pinned) with FSDP2 puts the final norm and LM head in a unit of their own with
#   `reshard_after_forward=False` ("forward-end / backward-start uses cluster", accelerate/utils/fsdp_utils.py
#   `fsdp2_prepare_model`), the embeddings in a unit resharded after forward, and the root gets PyTorch's default,
#   which for the root is not to reshard (torch.distributed.fsdp.fully_shard, `reshard_after_forward=None`).
# - "embeddings+head": the whole root unit (embeddings, final norm, LM head) stays whole: `fully_shard(model)` on
#   the root with decoder layers wrapped (torch's default for the root), and FSDP1 (`FullyShardedDataParallel`
#   never frees the root's parameters after forward), as Answer.AI's fsdp_qlora train.py ran.
FsdpRoot = Literal["head", "embeddings+head"]
USABLE_SHARE = 0.9  # the share of a card an estimate may fill: CUDA context, allocator fragmentation, spikes


def layer_activation_bytes(model: str | dict[str, Any], tokens: int) -> float:
    """Activations one Llama decoder layer keeps for its backward pass, bf16, flash attention (no seq x seq scores).

    Korthikanti et al. (2022) count 34 * tokens * hidden bytes per GPT layer without the attention scores: 11 for
    attention, 19 for the MLP (2 its input, 8 + 8 the two 4h-wide tensors around GeLU, 1 a dropout mask), 4 for the
    two layer norms. Llama's SwiGLU MLP keeps its input (2) and four i-wide bf16 tensors instead (the gate and up
    outputs, SiLU's output and the product: 2 bytes x 4 x i/h), and has no dropout:
    34 - 19 + 2 + 8 * i / h = 17 + 8 * i / h bytes per token per hidden unit (45 for Llama 3.1, where i/h = 3.5).
    Measured on small bf16 Llamas here without checkpointing (`layer_bytes_measured`: the slope of the peak over
    tokens and layers): 45.4 at i/h = 3.5 and 73.4 at i/h = 7 (the formula: 45 and 73).
    """
    c = _shape(model)
    h, i = c["hidden_size"], c["intermediate_size"]
    return tokens * h * (17 + 8 * i / h)


def backward_workspace_bytes(model: str | dict[str, Any], tokens: int) -> float:
    """What the backward pass holds besides saved activations: the gradient flowing down the residual stream, the
    final RMSNorm's fp32 copies and the running layer's gradient buffers. Measured on the small Llamas of
    `layer_bytes_measured` (the part of the peak per token that does not grow with the layer count, less the tiny
    vocabulary's logits): 17.9 bytes per token per hidden unit at i/h = 3.5 and 23.9 at i/h = 7, i.e.
    12 + 1.7 * i / h (18 for Llama 3.1)."""
    c = _shape(model)
    h, i = c["hidden_size"], c["intermediate_size"]
    return tokens * h * (12 + 1.7 * i / h)


def activation_bytes(model: str | dict[str, Any], batch: int, seq: int, checkpointing: bool = True,
                     loss: Loss = "transformers") -> tuple[float, float]:  # fmt: skip
    """(layer activations and backward workspace, loss logits) held on one GPU at the peak of a training step.

    Without gradient checkpointing every layer keeps its activations until the loss is computed: the peak is all
    layers + the logits + the backward workspace. With it each layer keeps only its input (2 * tokens * hidden bytes)
    and recomputes the rest in the backward pass, one layer at a time, after the logits are freed: the peak is the
    kept inputs + the larger of the logits and one layer's activations with the backward workspace.
    """
    c = _shape(model)
    tokens, layers = batch * seq, c["num_hidden_layers"]
    logits = tokens * c["vocab_size"] * LOGIT_BYTES[loss]
    one_layer = layer_activation_bytes(c, tokens) + backward_workspace_bytes(c, tokens)
    if not checkpointing:
        return layers * layer_activation_bytes(c, tokens) + backward_workspace_bytes(c, tokens), logits
    kept = layers * 2 * tokens * c["hidden_size"]
    return (kept, logits) if logits >= one_layer else (kept + one_layer, 0.0)


def _live_peaks(step: Callable[[Callable[[], None]], None]) -> list[int]:
    """Peaks of the bytes of live tensor storages while `step` runs (CPU): one each time `step` calls the `mark` it is
    given, and one at the end. Every storage an operator returns is counted until it is freed."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: dict[int, int] = {}
            self.now = self.peak = 0

        def _free(self, key: int) -> None:
            self.now -= self.sizes.pop(key, 0)

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.nbytes() and id(storage) not in self.sizes:
                        self.sizes[id(storage)] = storage.nbytes()
                        self.now += storage.nbytes()
                        weakref.finalize(storage, self._free, id(storage))
            self.peak = max(self.peak, self.now)
            return out

    peaks: list[int] = []
    with Live() as live:
        step(lambda: peaks.append(live.peak))
    return [*peaks, live.peak]


def _small_llama_step(size: dict[str, int], tokens: int, checkpointing: bool = False) -> list[int]:
    """Peaks after the forward pass and after the backward pass of one training step of a small bf16 Llama whose
    decoder layers' linear weights train and whose norms, embeddings and head are frozen (what LoRA's adapters need
    kept is the same: each targeted layer's input), on random token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{"hidden_size": 32, "intermediate_size": 112, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1, **size})  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".layers." in name and "_proj." in name
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(config.vocab_size, (1, tokens))

    def step(mark: Callable[[], None]) -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        mark()
        loss.backward()

    return _live_peaks(step)


def logits_bytes_measured(vocab: tuple[int, int] = (4000, 8000), tokens: int = 256) -> dict[str, float]:
    """Bytes per token per vocabulary entry that plain transformers allocates for the loss, measured on a 1-layer
    Llama: the slope of the peak over two vocabulary sizes leaves only what grows with the vocabulary. Returns the
    slope after the forward pass and at the peak of forward + backward (CPU, a few seconds)."""
    (f1, p1), (f2, p2) = (_small_llama_step({"vocab_size": v}, tokens) for v in vocab)
    per = (vocab[1] - vocab[0]) * tokens
    return {"forward": (f2 - f1) / per, "peak": (p2 - p1) / per}


def upcast_in_forward_bytes_measured(vocab: tuple[int, int] = (4000, 8000), tokens: int = 256) -> float:
    """The same slope for transformers of 2023-24, emulated with its operations (LlamaForCausalLM.forward ran
    `logits = self.lm_head(hidden_states).float()` and kept them in its output; the loss was CrossEntropyLoss over
    `logits[..., :-1, :].contiguous()`): bytes per token per vocabulary entry at the peak of forward + backward."""
    import torch

    def peak(size: int) -> int:
        torch.manual_seed(0)
        head = torch.nn.Linear(32, size, bias=False).to(torch.bfloat16).requires_grad_(False)
        hidden = torch.randn(1, tokens, 32, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(size, (1, tokens))

        def step(mark: Callable[[], None]) -> None:
            logits = head(hidden).float()  # returned in the model's output, so alive until the step ends
            shifted = logits[..., :-1, :].contiguous()
            loss = torch.nn.functional.cross_entropy(shifted.view(-1, size), labels[..., 1:].reshape(-1))
            del shifted
            mark()
            loss.backward()

        return _live_peaks(step)[-1]

    return (peak(vocab[1]) - peak(vocab[0])) / ((vocab[1] - vocab[0]) * tokens)


def layer_bytes_measured(ratio: float = 3.5, hidden: int = 64, tokens: tuple[int, int] = (128, 256)) -> float:
    """Bytes per token per hidden unit that one more decoder layer adds to the peak without checkpointing (a Llama
    with intermediate/hidden = `ratio` and a 16-token vocabulary, so the logits hardly count): the slope over tokens
    of the peak of a 2-layer model minus that of a 1-layer one. Compare with `layer_activation_bytes`."""
    size = {"vocab_size": 16, "hidden_size": hidden, "intermediate_size": int(ratio * hidden),
            "num_attention_heads": 4, "num_key_value_heads": 1}  # fmt: skip
    slopes = []
    for layers in (1, 2):
        low, high = (_small_llama_step({**size, "num_hidden_layers": layers}, n)[-1] for n in tokens)
        slopes.append((high - low) / (tokens[1] - tokens[0]) / hidden)
    return slopes[1] - slopes[0]


@dataclass
class MemoryEstimate:
    """GiB per GPU at the peak of a training step, by term (the terms add up to `total_gib`)."""

    model: str
    method: str
    strategy: str
    gpus: int
    offload: bool
    weights_gib: float  # the GPU's share of the weights, plus the layers gathered whole (ZeRO-3, FSDP)
    unsharded_gib: float  # FSDP: what stays whole between forward and backward beyond its shard (`FsdpRoot`)
    trainable_gib: float  # adapters (LoRA) or nothing separate (full: counted in weights)
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float  # the layers' activations held at the peak
    logits_gib: float  # the loss's logits and buffers held at the peak (`LOGIT_BYTES`)
    total_gib: float  # per GPU
    cpu_ram_gib: float  # moved to CPU RAM by offload, per GPU (a node holds this times its GPUs)
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
    targets: tuple[str, ...] = LINEAR,
    adapter_bytes: float = 4.0,
    adam_bytes: float = 8.0,
    loss: Loss = "transformers",
    fsdp_root: FsdpRoot = "head",
) -> MemoryEstimate:
    """GiB per GPU for weights, adapters, gradients, optimizer state, activations and the loss's logits.

    `batch` and `seq` are per GPU (one micro-batch); `adapter_bytes` is each adapter weight's and gradient's size
    (4: peft's fp32 adapters, 2: bf16), `adam_bytes` Adam's two moments per trained weight (8: fp32, 4: bf16,
    2: 8-bit); `loss` and `fsdp_root` pick the behaviours described at `LOGIT_BYTES` and `FsdpRoot`.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if loss not in LOGIT_BYTES:
        raise ValueError(f"Unknown loss {loss!r}: choose one of {', '.join(LOGIT_BYTES)}")
    c = _shape(model)
    counts = parameter_counts(c)
    if method == "full":
        trainable = counts["total"]
        weights, adapters, grads, optim = 2.0 * trainable, 0.0, 2.0 * trainable, (4.0 + adam_bytes) * trainable
    else:
        trainable = lora_parameters(c, r, targets)
        if method == "lora":
            weights = 2.0 * counts["total"]
        else:  # the linear layers in NF4; embeddings, LM head and norms stay bf16
            weights = NF4_BYTES * counts["linear"] + 2.0 * (counts["embeddings"] + counts["norms"])
        adapters, grads, optim = adapter_bytes * trainable, adapter_bytes * trainable, adam_bytes * trainable
    n = gpus
    if strategy in ("zero1", "zero2", "zero3", "fsdp_grad_op", "fsdp_full"):
        optim /= n
    if strategy in ("zero2", "zero3", "fsdp_grad_op", "fsdp_full"):
        grads /= n
    shards_weights = strategy in ("zero3", "fsdp_full")
    gathered = unsharded = 0.0
    if shards_weights:
        weights, adapters = weights / n, adapters / n
        if n > 1 or offload:  # the running layer and the prefetched next one, gathered whole (or from CPU RAM)
            layer = counts["linear"] / c["num_hidden_layers"]
            gathered = 2 * layer * (NF4_BYTES if method == "qlora" else 2.0)
    cpu = 0.0
    if offload:
        cpu += optim + grads
        optim = grads = 0.0
        if shards_weights:
            cpu += weights + adapters
            weights = adapters = 0.0
    if strategy == "fsdp_full" and (n > 1 or offload):  # whole from forward's end to backward's start
        head = c["vocab_size"] * c["hidden_size"] * 2.0  # bf16 (QLoRA leaves the LM head unquantised)
        root = head if fsdp_root == "head" or c["tie_word_embeddings"] else 2 * head
        unsharded = root if offload else root * (1 - 1 / n)
    activations, logits = activation_bytes(c, batch, seq, checkpointing, loss)
    total = weights + gathered + unsharded + adapters + grads + optim + activations + logits
    return MemoryEstimate(
        model=model if isinstance(model, str) else "custom",
        method=method,
        strategy=strategy,
        gpus=gpus,
        offload=offload,
        weights_gib=round((weights + gathered) / GIB, 2),
        unsharded_gib=round(unsharded / GIB, 2),
        trainable_gib=round(adapters / GIB, 2),
        gradients_gib=round(grads / GIB, 2),
        optimizer_gib=round(optim / GIB, 2),
        activations_gib=round(activations / GIB, 2),
        logits_gib=round(logits / GIB, 2),
        total_gib=round(total / GIB, 2),
        cpu_ram_gib=round(cpu / GIB, 2),
        trainable_parameters=trainable,
        parameters=counts["total"],
    )


def fits(e: MemoryEstimate, card_gib: float, usable: float = USABLE_SHARE) -> bool:
    """Whether an estimate fits a card of `card_gib` with `usable` of it to fill (a "24 GB" card holds 24 GiB)."""
    return e.total_gib <= usable * card_gib


def fewest_gpus(model: str | dict[str, Any], card_gib: float, max_gpus: int = 512, **settings: Any) -> int | None:
    """The fewest GPUs of `card_gib` on which `estimate(model, gpus=N, **settings)` fits (None: not even max_gpus)."""
    return next((n for n in range(1, max_gpus + 1) if fits(estimate(model, gpus=n, **settings), card_gib)), None)


def launcher_settings(config: str | Path) -> dict[str, Any]:
    """What an accelerate launcher config sets that the calculator needs: strategy, GPUs (processes), nodes and
    whether it offloads to CPU RAM (FSDP `fsdp_offload_params`; DeepSpeed an offload device of `cpu`)."""
    import yaml

    path = Path(config)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    kind = data.get("distributed_type")
    if kind == "FSDP":
        fsdp = data.get("fsdp_config", {})
        full = fsdp.get("fsdp_reshard_after_forward", True) in (True, "FULL_SHARD")
        strategy, offload = ("fsdp_full" if full else "fsdp_grad_op"), bool(fsdp.get("fsdp_offload_params", False))
    elif kind == "DEEPSPEED":
        ds = data.get("deepspeed_config", {})
        strategy = f"zero{ds.get('zero_stage', 0)}"
        devices = (ds.get("offload_optimizer_device"), ds.get("offload_param_device"))
        offload = "cpu" in devices
    elif kind == "MULTI_GPU":
        strategy, offload = "ddp", False
    else:
        raise ValueError(f"{path}: distributed_type {kind!r} is not one the memory calculator models")
    if strategy not in STRATEGIES:
        raise ValueError(f"{path}: {strategy!r} is not one the memory calculator models")
    return {"strategy": strategy, "gpus": int(data["num_processes"]), "nodes": int(data.get("num_machines", 1)),
            "offload": offload}  # fmt: skip


@dataclass(frozen=True)
class Published:
    """A published fine-tuning memory figure, the settings it was measured at, and how close the calculator must be.

    `kind` "allocated": a measured peak of live tensors per GPU; the calculator within `tolerance` (relative).
    `kind` "reserved": a peak of the caching allocator's reserved memory, which adds fragmentation and what loading
    left cached to the live tensors the calculator counts; the calculator between (1 - `tolerance`) x and 1 x it.
    `kind` "fits": the job ran on cards of `gib`; the calculator must fit the card (at most `gib`) and use at least
    (1 - `tolerance`) of it, or it would claim a smaller card suffices, which the source does not show.
    """

    name: str
    source: str
    gib: float
    kind: Literal["allocated", "reserved", "fits"]
    tolerance: float
    model: str | dict[str, Any]
    settings: dict[str, Any]

    def calculated(self) -> MemoryEstimate:
        return estimate(self.model, **self.settings)

    def holds(self, calculated_gib: float) -> bool:
        if self.kind == "allocated":
            return abs(calculated_gib - self.gib) <= self.tolerance * self.gib
        return (1 - self.tolerance) * self.gib <= calculated_gib <= self.gib

    def rule(self) -> str:
        if self.kind == "allocated":
            return f"within {self.tolerance:.0%}"
        return f"{1 - self.tolerance:.0%}-100% of it"


def profile_estimate(profile: Any, config: str | Path | None = None, **changes: Any) -> MemoryEstimate:
    """The calculator at a profile's settings (a `helpers.profiles.Profile` with a `distributed` section): its model
    size, engine, GPUs x nodes and offload (or those a launcher `config` sets), LoRA rank and targets, batch per GPU,
    sequence length, checkpointing and optimizer; `changes` override any of `estimate`'s arguments."""
    d = profile.distributed
    if d is None or d.model_size is None:
        raise ValueError(f"Profile {profile.name!r} has no distributed.model_size for the memory calculator")
    setup: dict[str, Any] = {"strategy": d.strategy, "gpus": d.gpus_per_node * d.nodes, "offload": d.offload}
    if config is not None:
        launcher = launcher_settings(config)
        setup = {"strategy": launcher["strategy"], "gpus": launcher["gpus"], "offload": launcher["offload"]}
    settings = {
        "method": "qlora" if profile.model.load_in_4bit else "lora",
        **setup,
        "r": profile.lora.r,
        "targets": tuple(profile.lora.target_modules),
        "batch": profile.train.per_device_train_batch_size,
        "seq": profile.model.max_seq_length,
        "checkpointing": profile.train.gradient_checkpointing,
        "adam_bytes": 2.0 if "8bit" in str(profile.train.optim) else 8.0,
        **changes,
    }
    return estimate(d.model_size, **settings)


# fmt: off
_ANSWERAI = "AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (peak reserved GiB, 2 x 3090 and 2 x 4090) with train.py"
_ANSWERAI_SETTINGS: dict[str, Any] = {
    "method": "qlora", "strategy": "fsdp_full", "gpus": 2, "seq": 2048, "r": 64, "adapter_bytes": 2.0,
    "adam_bytes": 4.0, "targets": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
    "fsdp_root": "embeddings+head", "loss": "upcast-in-forward"}
PUBLISHED: tuple[Published, ...] = (
    Published(
        "QLoRA paper: LLaMA 65B on one 48 GB GPU",
        "Dettmers et al. 2023 (arXiv:2305.14314); settings of artidoro/qlora scripts/finetune_guanaco_65b.sh: "
        "r=64 on all linear layers, batch 4 x 528 tokens (16 + 512), gradient checkpointing, bf16 adapters, "
        "paged 32-bit AdamW",
        48.0, "fits", 0.25, LLAMA_65B,
        {"method": "qlora", "strategy": "ddp", "gpus": 1, "r": 64, "batch": 4, "seq": 528, "adapter_bytes": 2.0,
         "loss": "upcast-in-forward"},
    ),
    Published(
        "torchtune: Llama 3.1 8B QLoRA on one RTX 4090",
        "pytorch/torchtune README memory table (7.4 GiB peak) with recipes/configs/llama3_1/8B_qlora_single_device"
        ".yaml: r=8 on all linear layers, batch 2 packed to 2048 tokens, activation checkpointing, bf16 adapters "
        "and AdamW states, CEWithChunkedOutputLoss, torch.compile",
        7.4, "allocated", 0.10, "8B",
        {"method": "qlora", "strategy": "ddp", "gpus": 1, "r": 8, "batch": 2, "seq": 2048, "adapter_bytes": 2.0,
         "adam_bytes": 4.0, "loss": "chunked"},
    ),
    Published(
        "Answer.AI: Llama 2 70B QLoRA on 2 x 24 GB, FSDP + CPU offload",
        f"{_ANSWERAI}: FSDP1 FULL_SHARD with CPUOffload(offload_params=True), batch 2 x 2048 tokens, r=64 on "
        "q/k/v/gate/up/down, gradient checkpointing, bf16; the README's 70B command on 'Dual 24GB GPUs'",
        14.92, "reserved", 0.45, LLAMA2_70B, {**_ANSWERAI_SETTINGS, "offload": True, "batch": 2},
    ),
    Published(
        "Answer.AI: Llama 2 7B QLoRA on 2 x 24 GB, FSDP, batch 10",
        f"{_ANSWERAI}: the same script without offload, batch 10 x 2048 tokens",
        20.97, "reserved", 0.45, LLAMA2_7B, {**_ANSWERAI_SETTINGS, "offload": False, "batch": 10},
    ),
)
# fmt: on


def published_comparison() -> list[dict[str, Any]]:
    """Each published figure next to the calculator's, and whether it is within the stated tolerance."""
    rows = []
    for p in PUBLISHED:
        e = p.calculated()
        rows.append({"published": p.name, "published_gib": p.gib, "kind": p.kind, "calculator_gib": e.total_gib,
                     "ratio": round(e.total_gib / p.gib, 3), "rule": p.rule(),
                     "holds": p.holds(e.total_gib)})  # fmt: skip
    return rows


def memory_table(
    models: tuple[str, ...] = ("8B", "70B", "405B"),
    methods: tuple[str, ...] = METHODS,
    strategies: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3", "fsdp_full"),
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
        parts = ("weights_gib", "unsharded_gib", "trainable_gib", "gradients_gib", "optimizer_gib", "activations_gib",
                 "logits_gib")  # fmt: skip
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
