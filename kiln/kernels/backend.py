"""Which implementation the kernel functions run: Liger-Kernel or the PyTorch references.

One process-wide switch, read on every call. "auto" picks Liger when the tensors are
on CUDA and `liger_kernel` imports, and the references otherwise; tests force either
path with `use_backend(...)`, which restores the previous choice on exit so nothing
leaks between tests.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from kiln.config import ConfigError

BACKENDS = ("auto", "liger", "torch")

_backend = "auto"


@dataclass
class KernelsConfig:
    backend: str = "auto"  # "auto" (Liger on CUDA when installed, else PyTorch), "liger" or "torch"
    ce_chunk_size: int = 0  # tokens per chunk of the reference linear cross-entropy; 0 = default_chunk_size()

    def __post_init__(self):
        _check_name(self.backend)
        if self.ce_chunk_size < 0:
            raise ConfigError(f"kernels.ce_chunk_size: must be >= 0 (0 = automatic), got {self.ce_chunk_size}")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ConfigError(f"kernels.backend: unknown backend {name!r} (known: {', '.join(BACKENDS)})")


def set_backend(name: str) -> None:
    """Select the implementation for every later kernel call in this process."""
    global _backend
    _check_name(name)
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("torch"): ...` forces a backend for the block, then restores the old one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def liger_importable() -> bool:
    """Whether `liger_kernel` (and so Triton) imports; asked only once CUDA tensors are seen,
    so a CPU run never pays for importing Triton."""
    try:
        importlib.import_module("liger_kernel.ops.rms_norm")
    except Exception:  # ImportError, or Triton failing to find a driver at import time
        return False
    return True


def use_liger(*tensors: torch.Tensor) -> bool:
    """Resolve the switch for one call on these tensors.

    "liger" on tensors that are not on CUDA is an error rather than a silent
    fallback: Liger's Triton kernels need a GPU, and a run configured for them
    should not quietly measure something else.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "liger":
        if not on_cuda:
            devices = sorted({str(t.device) for t in tensors})
            raise ConfigError(
                f"kernels.backend = 'liger' needs CUDA tensors, got tensors on {', '.join(devices)}: "
                "Liger-Kernel's Triton kernels run only on a GPU; use 'auto' or 'torch' here")
        if not liger_importable():
            raise ConfigError("kernels.backend = 'liger' but liger_kernel does not import "
                              "(pip install liger-kernel, which brings triton)")
        return True
    return on_cuda and liger_importable()
