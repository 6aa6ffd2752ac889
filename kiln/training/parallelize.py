"""Applying parallelism and kernels to the model, in one place.

`parallelize()` applies, in torchtitan's order: the recipe's kernels (Liger's RMSNorm /
SwiGLU / RoPE on CUDA, and the backend of the model's loss), then activation
checkpointing and torch.compile per decoder layer, then FSDP2 `fully_shard` per
decoder layer and at the root, with a mixed-precision policy of bf16 parameters for
compute and fp32 gradient reductions (the fp32 master weights stay sharded).
`autocast()` gives bf16 compute to a single unsharded process. The process group
itself is `kiln.training.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from kiln.config import ConfigError
from kiln.kernels import KernelsConfig, apply_liger_to_model, resolve_backend
from kiln.training.distributed import World


@dataclass
class ParallelConfig:
    mixed_precision: str = "fp32"  # "bf16": bf16 compute with fp32 master weights and reductions; "fp32"
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (memory for compute)
    compile: bool = False  # torch.compile each decoder layer
    fsdp: bool = True  # shard with FSDP2 when there is more than one process (always on GPU with torchrun)
    reshard_after_forward: bool = True  # free gathered parameters after each layer's forward (ZeRO-3)


def compute_dtype(cfg: ParallelConfig) -> torch.dtype:
    if cfg.mixed_precision not in ("fp32", "bf16"):
        raise ConfigError(f"[parallel] mixed_precision: expected 'fp32' or 'bf16', got {cfg.mixed_precision!r}")
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def sharded(cfg: ParallelConfig, world: World) -> bool:
    return cfg.fsdp and world.distributed and world.size > 1


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, world: World,
                kernels: KernelsConfig | None = None) -> torch.nn.Module:
    """Apply kernels, AC, compile and FSDP2 to a `kiln.training.model.CausalLM` in place."""
    apply_kernels(model, kernels or KernelsConfig(), world.device)
    layers = model.decoder_layers()
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if cfg.compile:
        for layer in layers:
            layer.compile(fullgraph=False)
    if sharded(cfg, world):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg), reduce_dtype=torch.float32)
        for i, layer in enumerate(layers):
            # The last layer's parameters are needed again at once by backward: keep them.
            last = i == len(layers) - 1
            fully_shard(layer, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and not last)
        # The root holds embeddings, the final norm and lm_head. The loss is computed
        # inside the root's forward (CausalLM.forward), where FSDP2 has gathered
        # lm_head's weight: computing a fused linear cross-entropy from the trainer
        # with `lm_head.weight` read outside a forward would see the resharded shard.
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def apply_kernels(model: torch.nn.Module, kernels: KernelsConfig, device: torch.device) -> str:
    """Resolve `[kernels] backend` for `device` and apply it: on "liger", Liger's RMSNorm /
    SwiGLU / RoPE replace transformers' modules (before anything wraps them), and the
    model's loss runs on the same backend. Returns "liger" or "reference"."""
    backend = resolve_backend(kernels.backend, device)
    if backend == "liger":
        apply_liger_to_model(model.hf)
    model.kernels = dataclasses.replace(kernels, backend=backend)
    return backend


def autocast(cfg: ParallelConfig, world: World):
    """bf16 compute without FSDP (one process): autocast, fp32 weights. With FSDP2
    the mixed-precision policy casts parameters itself and this is a no-op."""
    if compute_dtype(cfg) is torch.float32 or sharded(cfg, world):
        return contextlib.nullcontext()
    return torch.autocast(device_type=world.device.type, dtype=torch.bfloat16)
