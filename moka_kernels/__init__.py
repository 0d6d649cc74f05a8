"""Kronecker-mixture (MoKA) kernels, independent of vLLM.

Every implementation has the same signature, ``f(x, y, token_slots, bank) -> None``, and adds
``delta_W[slot] @ x[t]`` into ``y[t]`` in place for each token whose slot is not -1:

* :func:`moka_apply_naive` (``naive.py``): ``torch.kron`` per token in float64, the ground truth.
* :func:`moka_apply_torch` (``torch_ops.py``): batched reshape-and-matmul, the CPU fast path.
* ``moka_apply_cpp`` (``cpu_kernel.py`` over ``cpu_kernel.cpp``): token by token in one C call,
  the CPU path once ``cpu_kernel.load`` has built it: decode steps, and every batch where torch
  runs on one thread (``cpu_kernel.takes``).
* ``moka_apply_triton`` (``triton_ops.py``): one Triton launch for the whole batch, the GPU path
  (imported lazily, so this package needs only torch).

:func:`moka_apply` picks the Triton kernel for CUDA tensors, the C++ kernel for the CPU calls it
supports once loaded, and the torch path otherwise.
"""

from __future__ import annotations

import torch

from . import cpu_kernel
from .bank import EntryShape, KronEntry, MokaBank, choose_a_first
from .naive import delta_weight, moka_apply_naive
from .torch_ops import moka_apply_torch

__all__ = [
    "EntryShape",
    "KronEntry",
    "MokaBank",
    "choose_a_first",
    "delta_weight",
    "moka_apply",
    "moka_apply_naive",
    "moka_apply_torch",
]


def moka_apply(x: torch.Tensor, y: torch.Tensor, token_slots: torch.Tensor, bank: MokaBank) -> None:
    """Dispatch to the Triton kernel on CUDA and to the torch path elsewhere."""
    if x.is_cuda:
        from .triton_ops import moka_apply_triton

        moka_apply_triton(x, y, token_slots, bank)
    elif cpu_kernel.supports(x, bank):
        cpu_kernel.moka_apply_cpp(x, y, token_slots, bank)
    else:
        moka_apply_torch(x, y, token_slots, bank)
