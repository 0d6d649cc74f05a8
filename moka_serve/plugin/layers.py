"""MoKA layers: vLLM's LoRA linear layers plus a per-slot :class:`moka_kernels.MokaBank`.

Each class subclasses one of vLLM's LoRA wrappers and keeps its behaviour (LoRA buffers, vLLM's
dummy-LoRA warm-up, ``set_lora``), so LoRA and MoKA adapters share the same slots. The bank is
preallocated in ``create_lora_weights`` and written in place, so nothing is reallocated when
adapters are swapped (what CUDA graphs need). The forward adds the MoKA delta after the LoRA
delta in ``_apply_lora_to_output``; tokens of slot -1 (no adapter) are never touched.

Bank sizes are engine-start options read from the environment when the layers are built:

* ``MOKA_MAX_COMPONENTS`` (default 4): Kronecker components per adapted module (per output
  slice of a fused layer: q, k and v of ``qkv_proj`` each get this many).
* ``MOKA_MAX_FACTOR_NUMEL`` (default 4096): elements of one A or B factor (capped per layer at
  what a factor of that layer can have, so small models do not over-allocate).

An adapter over these limits is rejected when it is loaded, never at activation time.
"""

from __future__ import annotations

import os

import torch
from vllm.lora.layers.column_parallel_linear import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
)
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

from moka_kernels import KronEntry, MokaBank, moka_apply
from moka_kernels.torch_ops import group_tokens, moka_apply_torch

DEFAULT_MAX_COMPONENTS = 4
DEFAULT_MAX_FACTOR_NUMEL = 4096


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be positive")
    return value


def bank_limits() -> tuple[int, int]:
    """``(max components per module slice, max factor numel)`` from the environment."""
    return (
        _env_int("MOKA_MAX_COMPONENTS", DEFAULT_MAX_COMPONENTS),
        _env_int("MOKA_MAX_FACTOR_NUMEL", DEFAULT_MAX_FACTOR_NUMEL),
    )


class MokaLayerMixin:
    """Adds the MoKA bank to a vLLM LoRA linear layer (mixed in before the vLLM class)."""

    moka_bank: MokaBank
    # Slots that currently hold MoKA factors in this layer (host-side, so the forward can skip
    # the kernel without reading device memory).
    _moka_slots: set[int]

    def moka_slice_widths(self) -> list[int]:
        """Output slices of this layer as seen by this TP rank (one for a plain linear)."""
        return [int(self.output_size)]

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        if getattr(self, "tp_size", 1) > 1:
            raise RuntimeError(
                "moka-serve: tensor parallelism is not supported for MoKA adapters "
                f"(tensor_parallel_size={self.tp_size}); run with tensor_parallel_size=1"
            )
        max_components, max_numel = bank_limits()
        widths = self.moka_slice_widths()
        in_features = int(self.input_size)
        # No factor of a slice can have more elements than the slice's dense matrix.
        cap = min(max_numel, max(widths) * in_features)
        self.moka_bank = MokaBank(
            num_slots=max_loras,
            max_entries=max_components * len(widths),
            max_a_numel=cap,
            max_b_numel=cap,
            in_features=in_features,
            out_features=sum(widths),
            dtype=self.lora_a_stacked[0].dtype,
            device=self.lora_a_stacked[0].device,
            slice_widths=widths,
        )
        self._moka_slots = set()
        # Slots holding LoRA weights in this layer (set_lora), so the CPU forward can skip
        # vLLM's LoRA ops when no token of a step needs them.
        self._lora_slots: set[int] = set()
        self.moka_max_components = max_components

    def set_lora(self, index: int, *args, **kwargs) -> None:
        super().set_lora(index, *args, **kwargs)
        self._lora_slots.add(index)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self._lora_slots.discard(index)
        self.reset_moka(index)

    def reset_moka(self, index: int) -> None:
        if index in self._moka_slots:
            self.moka_bank.clear_slot(index)
            self._moka_slots.discard(index)

    def set_moka(self, index: int, entries: list[KronEntry]) -> None:
        """Write one adapter's folded factors into slot ``index`` (validated at load time)."""
        self.moka_bank.write_slot(index, entries)
        if entries:
            self._moka_slots.add(index)
        else:
            self._moka_slots.discard(index)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        step_slots = self.punica_wrapper.token_lora_indices
        slots = step_slots
        if slots.shape[0] != n:  # padded batches: extra rows get no adapter
            padded = torch.full((n,), -1, dtype=slots.dtype, device=slots.device)
            m = min(n, slots.shape[0])
            padded[:m] = slots[:m]
            slots = padded
        if x.is_cuda:
            # No host-side shortcuts: the forward may be captured in a CUDA graph (during
            # warm-up, with no adapter loaded), so both kernels are always part of it; the MoKA
            # kernel skips empty slots and tokens of slot -1 itself.
            output = super()._apply_lora_to_output(x, output)
            moka_apply(x2, output.view(-1, output.shape[-1]), slots, self.moka_bank)
            return output
        # Eager CPU: skip vLLM's LoRA ops unless a token of this step uses a slot that holds
        # LoRA weights in this layer. MoKA slots hold zero LoRA weights, so for base and MoKA
        # tokens those ops would only add zeros, at the cost of the whole LoRA path.
        # Groups of vLLM's own buffer stay right when rows were padded with -1 (no adapter).
        groups = self._moka_groups(step_slots) if step_slots.shape[0] <= n else group_tokens(slots)
        if any(slot in self._lora_slots for slot, _ in groups):
            output = super()._apply_lora_to_output(x, output)
        if self._moka_slots and groups:
            y2 = output.view(-1, output.shape[-1])
            moka_apply_torch(x2, y2, slots, self.moka_bank, groups=groups)
        return output

    def _moka_groups(self, slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Token groups of this step, computed once and shared by every layer.

        All layers of a step read the same ``token_lora_indices`` buffer, which vLLM rewrites
        in place each step (bumping its version counter), so (address, version, length) keys
        the step. Grouping costs a host sync and a sort: once per step, not once per layer.
        Only vLLM's long-lived buffer may be passed here: a temporary tensor could reuse a
        freed address with the same version and length in a later step.
        """
        key = (slots.data_ptr(), slots._version, slots.shape[0])
        cached = getattr(self.punica_wrapper, "_moka_groups", None)
        if cached is None or cached[0] != key:
            cached = (key, group_tokens(slots))
            self.punica_wrapper._moka_groups = cached
        return cached[1]


class MokaColumnParallelLinearWithLoRA(MokaLayerMixin, ColumnParallelLinearWithLoRA):
    """Column-parallel linear (one output slice)."""


class MokaMergedColumnParallelLinearWithLoRA(MokaLayerMixin, MergedColumnParallelLinearWithLoRA):
    """Merged column (e.g. ``gate_up_proj``): one slice per packed sub-module."""

    def moka_slice_widths(self) -> list[int]:
        return [int(w) for w in self.output_slices]


class MokaQKVParallelLinearWithLoRA(MokaLayerMixin, QKVParallelLinearWithLoRA):
    """Fused qkv checkpoint module adapted as a whole (one slice)."""


class MokaMergedQKVParallelLinearWithLoRA(MokaLayerMixin, MergedQKVParallelLinearWithLoRA):
    """q/k/v packed into ``qkv_proj``: three slices, k and v narrower under GQA."""

    def moka_slice_widths(self) -> list[int]:
        return [int(w) for w in self.output_slices]


class MokaRowParallelLinearWithLoRA(MokaLayerMixin, RowParallelLinearWithLoRA):
    """Row-parallel linear (e.g. ``o_proj``, ``down_proj``)."""


# vLLM class -> MoKA class, replaced position for position in ``_all_lora_classes`` so vLLM's
# matching order is unchanged.
REPLACEMENTS: dict[type, type] = {
    ColumnParallelLinearWithLoRA: MokaColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA: MokaMergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA: MokaQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA: MokaMergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA: MokaRowParallelLinearWithLoRA,
}


def install() -> None:
    """Swap the MoKA classes into ``vllm.lora.utils._all_lora_classes`` (idempotent)."""
    from vllm.lora import utils as lora_utils

    lora_utils._all_lora_classes = tuple(
        REPLACEMENTS.get(cls, cls) for cls in lora_utils._all_lora_classes
    )
