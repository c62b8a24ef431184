"""Size a recipe before renting the GPUs for it (`nmt-moe plan`, nmt_moe/cli/plan.py).

Reads a training config (the YAML `nmt-moe train` takes), builds its Seq2Seq on the meta device (shapes
only, no weights allocated, so a multi-billion-parameter model builds in seconds on a laptop) and reports:

- total parameters and the active ones a token uses (its k experts per MoE layer, not the whole bank);
- FLOPs per target token for a forward pass (and about 3x that for training);
- memory per device for a number of GPUs and an expert-parallel size: weights, gradients, optimizer state
  (Adam/AdamW or Adafactor, as the config says), expert banks divided across the expert-parallel group, the
  gates' fp32 [tokens, experts] tensors and a rough activation estimate for one batch;
- the peak per device while training, validating and checkpointing, checked against one GPU's memory.

    nmt-moe plan recipes/wmt14_en_de/config.yaml --gpus 8 --expert-parallel-size 8
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from nmt_moe.models import Seq2Seq, Seq2SeqConfig, parameter_counts
from nmt_moe.models.attention import Attention
from nmt_moe.moe import FeedForward, MoELayer, moe_layers

GIB = 1024**3
# Lightning precision -> (bytes per weight/gradient/optimizer value, bytes per activation). Mixed precision
# keeps fp32 master weights, gradients and optimizer state and computes activations in 16 bits.
PRECISION_BYTES = {
    "32-true": (4, 4),
    "32": (4, 4),
    "bf16-mixed": (4, 2),
    "16-mixed": (4, 2),
    "bf16-true": (2, 2),
    "16-true": (2, 2),
}
OPTIMIZERS = ("adam", "adamw", "adafactor")


class PlanError(ValueError):
    """A config `plan` cannot size, with the reason."""


@dataclass
class Recipe:
    """What `plan` reads from a training config."""

    model_args: dict[str, Any]  # the Seq2SeqConfig as a dict (nested moe section), vocab_size included
    optimizer: str = "adam"
    precision: str = "bf16-mixed"  # what `nmt-moe train` picks on a bf16-capable GPU
    tokens_per_batch: int = 4096  # the data module's max_tokens: per device and step
    notes: list[str] = field(default_factory=list)  # where a value came from when the config lacked it


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """config[name], unwrapping LightningCLI's {class_path, init_args} form."""
    section = config.get(name) or {}
    if not isinstance(section, dict):
        raise PlanError(f"`{name}:` must be a mapping, got {type(section).__name__}")
    return dict(section.get("init_args", section))


def read_recipe(path: str | Path) -> Recipe:
    """The model, optimizer, precision and batch size of a LightningCLI training config."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"config file not found: {path}")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise PlanError(f"{path}: expected a mapping at the top level")
    module, data, trainer = _section(config, "model"), _section(config, "data"), _section(config, "trainer")
    if "model" not in module:
        raise PlanError(f"{path}: no `model: model:` section (the Seq2Seq's settings)")
    model = module["model"]
    model_args = dict(model.get("init_args", model) if isinstance(model, dict) else {})  # init_args: old
    pipeline = data.get("pipeline") if isinstance(data.get("pipeline"), dict) else data
    notes: list[str] = []
    if "vocab_size" not in model_args:
        if "vocab_size" not in pipeline:
            raise PlanError(f"{path}: no vocab_size in `model: model:` nor in `data: pipeline:`")
        model_args["vocab_size"] = pipeline["vocab_size"]  # `nmt-moe train` links it to the model
    try:
        model_args = asdict(Seq2SeqConfig.from_dict(model_args))  # every knob, defaults filled
    except (TypeError, ValueError) as error:
        raise PlanError(f"{path}: the model section does not build: {error}") from error
    recipe = Recipe(model_args=model_args, notes=notes)
    recipe.optimizer = module.get("optimizer", recipe.optimizer)
    if recipe.optimizer not in OPTIMIZERS:
        raise PlanError(f"{path}: optimizer must be one of {OPTIMIZERS}, got {recipe.optimizer!r}")
    if trainer.get("precision") is not None:
        recipe.precision = str(trainer["precision"])
    else:
        notes.append(f"trainer.precision not set: assumed {recipe.precision} (the GPU default of train)")
    if recipe.precision not in PRECISION_BYTES:
        raise PlanError(f"{path}: precision {recipe.precision!r} is not one of {sorted(PRECISION_BYTES)}")
    if data.get("max_tokens") is not None:
        recipe.tokens_per_batch = int(data["max_tokens"])
    else:
        notes.append(f"data.max_tokens not set: assumed {recipe.tokens_per_batch} tokens per batch")
    return recipe


def build_on_meta(model_args: dict[str, Any]) -> Seq2Seq:
    """The Seq2Seq with every parameter on the meta device: shapes, no storage."""
    try:
        with torch.device("meta"):
            return Seq2Seq(Seq2SeqConfig.from_dict(model_args))
    except (TypeError, ValueError) as error:
        raise PlanError(f"the model section does not build: {error}") from error


# --- parameters --------------------------------------------------------------------------------------------


def _is_expert_bank(name: str) -> bool:
    return ".experts." in f".{name}"


def parameter_groups(model: nn.Module) -> dict[str, int]:
    """Parameters by part of the model (tied weights counted once, under the embeddings)."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():  # yields a shared tensor once, under its first name
        if _is_expert_bank(name):
            group = "moe experts"
        elif ".moe." in name and ".gate." in name:
            group = "moe gates"
        elif ".moe." in name:
            group = "moe shared experts / dense ffn"
        elif "embedding" in name:
            group = "embeddings"
        elif name.startswith("decoder.attention"):
            group = "attention"
        elif name.startswith(("decoder.combine", "decoder.output")):
            group = "output layer"
        else:
            group = f"{name.split('.')[0]} lstm"
        groups[group] = groups.get(group, 0) + p.numel()
    return groups


# --- FLOPs -------------------------------------------------------------------------------------------------


def _lstm_macs(lstm: nn.LSTM | nn.LSTMCell) -> int:
    """Multiply-adds per token of one LSTM layer (all directions): 4 gates of (input + hidden) x hidden."""
    h = lstm.hidden_size
    directions = 2 if getattr(lstm, "bidirectional", False) else 1
    return directions * 4 * h * (lstm.input_size + h)


def _moe_macs(layer: MoELayer) -> int:
    """Multiply-adds per routed token: the router matmuls (clean and noise projections, as in training; in
    evaluation the noisy gates skip the noise one) plus the experts the token visits."""
    router = sum(p.numel() for p in layer.gate.parameters())  # d x E matmuls
    w_in, w_out = layer.experts.w_in, layer.experts.w_out  # [E, d, h_in], [E, h, d]
    per_expert = w_in[0].numel() + w_out[0].numel()
    return router + layer.experts_per_token * per_expert


def flops_per_target_token(model: nn.Module, src_len: float, src_tgt_ratio: float = 1.0) -> dict[str, float]:
    """Forward FLOPs (2 x multiply-adds) per target token, by side, walking the model's modules.

    Encoder modules run once per source token and count `src_tgt_ratio` times per target token; decoder
    modules once per target token, except the attention key projection (once per source token). Attention
    scoring and the context sum cost 2 x src_len x hidden per target token. Embeddings, biases and
    element-wise ops are ignored.
    """
    macs = {"encoder": 0.0, "decoder": 0.0, "attention": 0.0}
    counted: set[str] = set()  # modules inside an MoELayer or FeedForward are counted by it
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in counted):
            continue
        side = "encoder" if name.startswith("encoder") else "decoder"
        per_src_token = side == "encoder" or name.endswith("attention.key_proj")
        weight = src_tgt_ratio if per_src_token else 1.0
        if isinstance(module, nn.LSTM | nn.LSTMCell):
            if getattr(module, "proj_size", 0):
                raise PlanError(f"{name}: LSTM projections are not sized by plan yet")
            macs[side] += weight * _lstm_macs(module)
        elif isinstance(module, MoELayer):
            counted.add(name)
            shared = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
            macs[side] += weight * (_moe_macs(module) + shared)
        elif isinstance(module, FeedForward):
            counted.add(name)
            macs[side] += weight * sum(m.in_features * m.out_features for m in module.modules()
                                       if isinstance(m, nn.Linear))  # fmt: skip
        elif isinstance(module, nn.Linear) and name.endswith("attention.v"):
            continue  # the additive score vector runs per source position: counted with the scoring below
        elif isinstance(module, nn.Linear):
            part = "attention" if "attention" in name else side
            macs[part] += weight * module.in_features * module.out_features
        elif isinstance(module, Attention):
            hidden = model.decoder.hidden_size
            macs["attention"] += 2 * src_len * hidden  # per source position: score (q.k or v.tanh) + context
    flops = {side: 2.0 * value for side, value in macs.items()}
    flops["forward"] = sum(flops.values())
    flops["training"] = 3.0 * flops["forward"]  # backward ~ 2x forward
    return flops


# --- memory ------------------------------------------------------------------------------------------------


def optimizer_values(param: torch.Tensor, optimizer: str) -> int:
    """Optimizer-state values kept for one parameter: Adam(W) keeps two moments; torch's Adafactor keeps
    row and column second-moment factors over the last two dims (full variance for vectors) and no
    momentum."""
    if optimizer in ("adam", "adamw"):
        return 2 * param.numel()
    if param.dim() < 2:
        return param.numel()
    shape = param.shape
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def activation_values_per_token(model: nn.Module, src_len: float, src_tgt_ratio: float = 1.0) -> float:
    """Rough count of activation values kept for backward per target token (within ~2x): per LSTM layer its
    input, 4 gates, cell and output; per MoE layer its input and, per visited expert, the token copy, hidden
    pre-activation and output; attention weights and context. The logits and the gates' fp32 [tokens, E]
    tensors are counted apart (`memory_per_device`): they are fp32 whatever the precision."""
    values = {"encoder": 0.0, "decoder": 0.0}
    for name, module in model.named_modules():
        side = "encoder" if name.startswith("encoder") else "decoder"
        weight = src_tgt_ratio if side == "encoder" else 1.0
        if isinstance(module, nn.LSTM | nn.LSTMCell):
            directions = 2 if getattr(module, "bidirectional", False) else 1
            values[side] += weight * (module.input_size + directions * 6 * module.hidden_size)
        elif isinstance(module, MoELayer):
            d, h_in = module.experts.w_in.shape[1:]
            values[side] += weight * (d + module.experts_per_token * (2 * d + h_in))
        elif isinstance(module, FeedForward):
            values[side] += weight * (module.w_in.in_features + module.w_in.out_features)
        elif isinstance(module, Attention):
            values["decoder"] += 2 * src_len + 2 * model.decoder.hidden_size
    return values["encoder"] + values["decoder"]


def gate_values_per_token(model: nn.Module) -> float:
    """fp32 values per token the gates keep for backward: the router runs outside autocast, and a noisy
    top-k gate keeps about four [tokens, E] tensors per MoE layer (clean and noisy logits, noise scale,
    softmax); hierarchical gates add a [tokens, groups] level."""
    return float(sum(4 * layer.num_experts for _, layer in moe_layers(model)))


def memory_per_device(
    model: nn.Module,
    *,
    optimizer: str,
    precision: str,
    tokens_per_batch: int,
    expert_parallel_size: int,
    src_len: float,
) -> dict[str, float]:
    """Bytes per device. Expert banks are split evenly over the expert-parallel group; everything else is
    replicated (data parallel), and each device trains on its own `tokens_per_batch` tokens.

    Besides weights, gradients and optimizer state: under mixed precision the 16-bit copies of the weights
    autocast makes (kept for backward); the logits in the compute dtype plus the fp32 log-softmax of the
    loss and its fp32 gradient; the gates' fp32 [tokens, E] tensors (`gate_values_per_token`); other
    activations as `activation_values_per_token` counts them. Checked
    against one real training step on an H200 (bf16-mixed, Adam, 256 sentences of 32 tokens): the WMT
    flat-32 recipe peaked at 8.0 GiB (this estimate: 6.75), the 2048-expert recipe cut to 512 experts at
    41.8 GiB (estimate: 40.6)."""
    state_bytes, act_bytes = PRECISION_BYTES[precision]
    local = opt_values = 0.0  # parameters and optimizer values this device holds
    for name, p in model.named_parameters():
        share = 1.0 / expert_parallel_size if _is_expert_bank(name) else 1.0
        local += share * p.numel()
        opt_values += share * optimizer_values(p, optimizer)
    # Target tokens per batch: max_tokens budgets the padded longer side, so about that many of each side.
    vocab = model.decoder.output.out_features
    memory = {
        "weights": local * state_bytes,
        "gradients": local * state_bytes,
        "optimizer": opt_values * state_bytes,
        "weight_copies": local * act_bytes if act_bytes < state_bytes else 0.0,
        "logits": tokens_per_batch * vocab * (act_bytes + 4 + 4),
        "activations": tokens_per_batch * activation_values_per_token(model, src_len) * act_bytes,
        "gate_fp32": tokens_per_batch * gate_values_per_token(model) * 4,
    }
    memory["total"] = sum(memory.values())
    return memory


def peaks_per_device(
    model: nn.Module, memory: dict[str, float], *, optimizer: str, tokens_per_batch: int, precision: str,
    expert_parallel_size: int,
) -> dict[str, float]:  # fmt: skip
    """Peak bytes per device in each phase, from `memory_per_device`'s parts.

    - training: one step (`memory["total"]`);
    - validation: weights, optimizer state and the last step's gradients stay allocated (Lightning zeroes
      gradients at the next step); a teacher-forced forward without saved activations keeps its logits in
      the compute dtype, their fp32 copy and log-softmax, and one MoE layer's gate tensors at a time; the
      experts stay sharded (greedy decoding in lockstep: its states are a few [sentences, hidden] rows);
    - checkpoint: the same resident state plus one tensor in flight (each rank writes its own shards
      through torch.distributed.checkpoint, tensor by tensor, to host memory);
    - checkpoint_if_gathered: what gathering the full expert banks and both Adam moments onto every rank
      would add (the layout before sharded checkpoints), for comparison.
    """
    state_bytes, act_bytes = PRECISION_BYTES[precision]
    resident = sum(memory[part] for part in ("weights", "gradients", "optimizer", "weight_copies"))
    vocab = model.decoder.output.out_features
    largest_gate = max((4 * layer.num_experts for _, layer in moe_layers(model)), default=0)
    largest = max(
        p.numel() / (expert_parallel_size if _is_expert_bank(name) else 1)
        for name, p in model.named_parameters()
    )
    bank = sum(
        p.numel() + optimizer_values(p, optimizer)
        for name, p in model.named_parameters()
        if _is_expert_bank(name)
    )  # weights and optimizer values of every expert bank
    gathered = bank * (1 - 1 / expert_parallel_size) * state_bytes
    return {
        "training": memory["total"],
        "validation": resident + tokens_per_batch * (vocab * (act_bytes + 4 + 4) + largest_gate * 4),
        "checkpoint": resident + largest * state_bytes,
        "checkpoint_if_gathered": resident + gathered,
    }


# --- the report --------------------------------------------------------------------------------------------


def plan(
    config: str | Path,
    *,
    gpus: int = 1,
    expert_parallel_size: int = 1,
    tokens_per_batch: int | None = None,
    src_len: float = 30.0,
    gpu_memory_gib: float = 80.0,
) -> dict[str, Any]:
    """Everything `nmt-moe plan` prints, as a JSON-ready dict."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if expert_parallel_size < 1 or gpus % expert_parallel_size:
        raise PlanError(f"--expert-parallel-size must divide --gpus={gpus}, got {expert_parallel_size}")
    recipe = read_recipe(config)
    if tokens_per_batch is not None:
        recipe.tokens_per_batch = tokens_per_batch
    model = build_on_meta(recipe.model_args)
    experts = [layer for _, layer in moe_layers(model)]
    for layer in experts:
        if layer.num_experts % expert_parallel_size:
            raise PlanError(
                f"--expert-parallel-size={expert_parallel_size} must divide num_experts={layer.num_experts}"
            )
    counts = parameter_counts(model)
    state_bytes, act_bytes = PRECISION_BYTES[recipe.precision]
    memory = memory_per_device(
        model,
        optimizer=recipe.optimizer,
        precision=recipe.precision,
        tokens_per_batch=recipe.tokens_per_batch,
        expert_parallel_size=expert_parallel_size,
        src_len=src_len,
    )
    peaks = peaks_per_device(
        model, memory, optimizer=recipe.optimizer, tokens_per_batch=recipe.tokens_per_batch,
        precision=recipe.precision, expert_parallel_size=expert_parallel_size,
    )  # fmt: skip
    peak = max(peaks[phase] for phase in ("training", "validation", "checkpoint"))
    assumptions = [
        *recipe.notes,
        f"{gpus} GPU(s): each expert bank split evenly over {expert_parallel_size} device(s) (expert "
        f"parallelism), all other weights replicated on every device (data parallel)",
        f"precision {recipe.precision}: {state_bytes} bytes per weight, gradient and optimizer value, "
        f"{act_bytes} per activation",
        f"optimizer {recipe.optimizer}: "
        + ("2 moments per weight" if recipe.optimizer != "adafactor" else "factored second moments only"),
        f"{recipe.tokens_per_batch} tokens per device and step; source as long as the target, "
        f"{src_len:g} source tokens per sentence for attention",
        "FLOPs = 2 x multiply-adds; training ~ 3 x forward; memory leaves out framework workspaces, "
        "all-to-all staging and fragmentation (one measured step peaked 3-20% above the estimate)",
    ]
    return {
        "config": str(config),
        "model": recipe.model_args,
        "parameters": {
            "total": counts["total"],
            "active": counts["active"],
            "by_part": parameter_groups(model),
        },
        "moe_layers": [
            {"experts": m.num_experts, "experts_per_token": m.experts_per_token, "gate": m.gate_name}
            for m in experts
        ],
        "flops_per_target_token": flops_per_target_token(model, src_len),
        "memory_per_device_bytes": memory,
        "peak_per_device_bytes": peaks,
        "fits": {
            "gpu_memory_gib": gpu_memory_gib,
            "peak_gib": peak / GIB,
            "fits": peak <= gpu_memory_gib * GIB,
        },
        "gpus": gpus,
        "expert_parallel_size": expert_parallel_size,
        "recipe": {k: v for k, v in asdict(recipe).items() if k not in ("model_args", "notes")},
        "assumptions": assumptions,
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_plan(report: dict[str, Any]) -> str:
    params, flops = report["parameters"], report["flops_per_target_token"]
    memory = report["memory_per_device_bytes"]
    lines = [
        f"plan for {report['config']}",
        f"parameters: total {_human(params['total'])} ({params['total']:,}), "
        f"active per token {_human(params['active'])} ({params['active']:,})",
    ]
    parts = sorted(params["by_part"].items(), key=lambda item: -item[1])
    lines += [f"  {part:<32} {_human(n):>9}" for part, n in parts]
    for i, layer in enumerate(report["moe_layers"]):
        per_token = f"{layer['experts_per_token']} per token ({layer['gate']})"
        lines.append(f"  MoE layer {i}: {layer['experts']} experts, {per_token}")
    lines += [
        f"FLOPs per target token: forward {_human(flops['forward'])} (encoder {_human(flops['encoder'])}, "
        f"decoder {_human(flops['decoder'])}, attention {_human(flops['attention'])}), "
        f"training ~{_human(flops['training'])}",
        f"memory per device ({report['gpus']} GPUs, expert-parallel size {report['expert_parallel_size']}):",
    ]
    lines += [f"  {part:<14} {memory[part] / GIB:10.2f} GiB" for part in memory]
    lines.append("peak per device by phase:")
    lines += [
        f"  {phase:<22} {value / GIB:10.2f} GiB" for phase, value in report["peak_per_device_bytes"].items()
    ]
    fits = report["fits"]
    verdict = "fits" if fits["fits"] else "does NOT fit"
    lines.append(f"peak {fits['peak_gib']:.2f} GiB of {fits['gpu_memory_gib']:g} GiB per GPU: {verdict}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in report["assumptions"]]
    return "\n".join(lines)
