"""Everything about running the model on one process or many, in one place.

`init_distributed()` joins the torchrun process group when there is one (gloo on CPU,
NCCL on GPU; multi-node through torchrun's rendezvous) and otherwise leaves a plain
single process. `parallelize()` applies, in torchtitan's order, activation
checkpointing and torch.compile per decoder layer, then FSDP2 `fully_shard` per
decoder layer and at the root, with a mixed-precision policy of bf16 parameters for
compute and fp32 gradient reductions (the fp32 master weights stay sharded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.config import ConfigError


@dataclass
class ParallelConfig:
    mixed_precision: str = "fp32"  # "bf16": bf16 compute with fp32 master weights and reductions; "fp32"
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (memory for compute)
    compile: bool = False  # torch.compile each decoder layer
    fsdp: bool = True  # shard with FSDP2 when there is more than one process (always on GPU with torchrun)
    reshard_after_forward: bool = True  # free gathered parameters after each layer's forward (ZeRO-3)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """The torchrun world, or a single process. torchrun sets RANK / WORLD_SIZE /
    LOCAL_RANK and the rendezvous address; a plain `python -m kiln.training` has none."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return World(device=device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def compute_dtype(cfg: ParallelConfig) -> torch.dtype:
    if cfg.mixed_precision not in ("fp32", "bf16"):
        raise ConfigError(f"[parallel] mixed_precision: expected 'fp32' or 'bf16', got {cfg.mixed_precision!r}")
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, world: World) -> torch.nn.Module:
    """Apply Liger (CUDA), AC, compile and FSDP2 to a `kiln.training.model.CausalLM` in place."""
    from kiln.kernels import maybe_apply_liger

    # Liger's RMSNorm / RoPE / SwiGLU replace transformers' modules before anything wraps them.
    maybe_apply_liger(model.hf)
    layers = model.decoder_layers()
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if cfg.compile:
        for layer in layers:
            layer.compile(fullgraph=False)
    if cfg.fsdp and world.distributed and world.size > 1:
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


def autocast(cfg: ParallelConfig, world: World, model: torch.nn.Module):
    """bf16 compute without FSDP (one process): autocast, fp32 weights. With FSDP2
    the mixed-precision policy casts parameters itself and this is a no-op."""
    import contextlib

    sharded = cfg.fsdp and world.distributed and world.size > 1
    if compute_dtype(cfg) is torch.float32 or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device_type=world.device.type, dtype=torch.bfloat16)


def all_reduce_mean(value: float, world: World) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
