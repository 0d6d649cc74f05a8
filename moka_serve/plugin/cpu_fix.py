"""Fix for vLLM 0.32's CPU LoRA ops: tokens without an adapter (slot -1) got the last slot's LoRA.

``vllm/lora/ops/torch_ops/lora_ops.py`` gathers ``weights[lora_indices]``; with the no-adapter
index -1 that is Python's "last element", so a base-model request batched with LoRA requests
silently gets the LoRA in slot ``max_loras - 1`` (upstream PR vllm-project/vllm#48421). The fix
zeroes the input rows of -1 tokens before the original op runs, so whatever weights are gathered
for them contribute exactly zero (``shrink`` writes zeros, ``expand`` adds zeros).

The prefill path (``sgmv_*``) calls ``bgmv_*`` through ``lora_ops``'s globals and the decode path
calls the names ``punica_cpu`` imported, so both modules are patched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_PATCHED_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
ORIGINALS: dict[str, Callable] = {}


def _mask_rows(inputs: torch.Tensor, lora_indices_tensor: torch.Tensor) -> torch.Tensor:
    """``inputs`` with the rows of no-adapter tokens zeroed (a copy only when needed)."""
    if lora_indices_tensor.numel() != inputs.shape[0]:
        return inputs  # broadcast forms (one index for all rows): nothing row-wise to mask
    no_adapter = lora_indices_tensor < 0
    if not bool(no_adapter.any()):
        return inputs
    return inputs.masked_fill(no_adapter.unsqueeze(-1), 0)


def _fixed(original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(
        inputs: torch.Tensor,
        lora_b_weights: torch.Tensor,
        output_tensor: torch.Tensor,
        lora_indices_tensor: torch.Tensor,
        *args,
        **kwargs,
    ):
        return original(
            _mask_rows(inputs, lora_indices_tensor),
            lora_b_weights,
            output_tensor,
            lora_indices_tensor,
            *args,
            **kwargs,
        )

    wrapper.__moka_fixed__ = True  # type: ignore[attr-defined]
    return wrapper


def fixed_ops() -> dict[str, Callable]:
    """The fixed versions of the three ``bgmv_*`` ops (built from the unpatched originals)."""
    from vllm.lora.ops.torch_ops import lora_ops

    out = {}
    for name in _PATCHED_NAMES:
        original = ORIGINALS.get(name, getattr(lora_ops, name))
        out[name] = _fixed(original)
    return out


def install() -> None:
    """Patch ``lora_ops`` and ``punica_cpu`` in place (idempotent)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "__moka_fixed__", False):
        return
    for name in _PATCHED_NAMES:
        ORIGINALS[name] = getattr(lora_ops, name)
    for name, fn in fixed_ops().items():
        setattr(lora_ops, name, fn)
        setattr(punica_cpu, name, fn)
