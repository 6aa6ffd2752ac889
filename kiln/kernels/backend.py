"""Which implementation a kernel runs: Liger-Kernel's Triton kernels or the PyTorch references.

A training recipe chooses in its `[kernels]` table (`KernelsConfig`), which
`kiln.training.parallelize.parallelize()` resolves once for the run's device
(`resolve_backend`) and applies to the model. "auto" is Liger on CUDA when
`liger_kernel` imports and the references otherwise; "liger" where it cannot run is
a ConfigError rather than a silent fallback.

Code that calls `kiln.kernels.linear_cross_entropy` without naming a backend gets
"auto", unless it runs inside `with use_backend(...)`, the switch tests use to force
either path. The switch is a context variable restored on exit: nothing a test sets
outlives its block.
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

from kiln.config import ConfigError

BACKENDS = ("auto", "reference", "liger")


@dataclass
class KernelsConfig:
    backend: str = "auto"  # "auto" (Liger on CUDA when it imports, else the references), "reference" or "liger"
    ce_chunk_size: int = 0  # tokens per chunk of the reference linear cross-entropy; 0 = reference.default_chunk_size

    def check(self, where: str = "[kernels]") -> None:
        """Raise a ConfigError naming `where` for a value no kernel accepts."""
        check_backend(self.backend, where)
        if self.ce_chunk_size < 0:
            raise ConfigError(f"{where} ce_chunk_size: must be >= 0 (0 = automatic), got {self.ce_chunk_size}")


def check_backend(name: str, where: str = "[kernels]") -> None:
    if name not in BACKENDS:
        raise ConfigError(f"{where} backend: unknown backend {name!r} (known: {', '.join(BACKENDS)})")


# The backend of calls that name none; only `use_backend` changes it, and only for its block.
_default_backend: ContextVar[str] = ContextVar("kiln_kernels_backend", default="auto")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("reference"): ...` runs the block's kernel calls that name no
    backend on that one; the previous choice is back on exit, exception or not."""
    check_backend(name)
    token = _default_backend.set(name)
    try:
        yield
    finally:
        _default_backend.reset(token)


def default_backend() -> str:
    """The backend of a call that names none: "auto", or the innermost `use_backend`'s."""
    return _default_backend.get()


@functools.cache
def liger_importable() -> bool:
    """Whether `liger_kernel` (and so Triton) imports; asked only once a CUDA device is
    involved, so a CPU run never pays for importing Triton."""
    try:
        importlib.import_module("liger_kernel.ops.rms_norm")
    except Exception:  # ImportError, or Triton failing to find a driver at import time
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """What backend `name` means for work on `device`: "reference" or "liger".

    "liger" off CUDA is an error rather than a silent fallback: Liger's Triton kernels
    need a GPU, and a run configured for them should not quietly measure something else.
    """
    check_backend(name)
    on_cuda = torch.device(device).type == "cuda"
    if name == "reference":
        return "reference"
    if name == "liger":
        if not on_cuda:
            raise ConfigError(
                f"[kernels] backend = 'liger' needs CUDA, but this runs on {torch.device(device)}: "
                "Liger-Kernel's Triton kernels run only on a GPU; use 'auto' or 'reference' here")
        if not liger_importable():
            raise ConfigError("[kernels] backend = 'liger' but liger_kernel does not import "
                              "(pip install liger-kernel, which brings triton)")
        return "liger"
    return "liger" if on_cuda and liger_importable() else "reference"


def resolve_for(backend: str | None, *tensors: torch.Tensor) -> str:
    """`resolve_backend` for one call on these tensors; `backend` None is `default_backend()`.
    Liger needs every tensor on CUDA, so the device checked is the first one that is not."""
    off_cuda = [t.device for t in tensors if not t.is_cuda]
    device = off_cuda[0] if off_cuda else tensors[0].device
    return resolve_backend(backend or default_backend(), device)
