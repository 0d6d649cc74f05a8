"""Per-step MoKA metadata, built once per model step outside any traced graph.

The analogue of vLLM's ``LoRAKernelMeta`` (``vllm/lora/ops/triton_ops/lora_kernel_metadata.py``):
the model manager fills it in ``_set_adapter_mapping``, right after the punica wrapper's
``update_metadata``, and every MoKA layer of the step reads it inside its custom op. Buffers are
preallocated for the largest batch and written in place, so a CUDA graph captured over the op
keeps reading the current step's values; layers slice them by their own token count
``x.size(0)``, which may exceed the step's when the runner pads the batch. Rows past the step's
tokens always hold slot -1 (no adapter).

* CPU: the token groups of :func:`moka_kernels.torch_ops.group_tokens` (one host sync and one sort
  per step, not per layer) and the set of slots present.
* CUDA: the Triton kernel's grouping (tokens sorted by slot with -1 last, group starts for the
  decode and prefill forms) over the whole buffer; any prefix of it is a valid plan for that many
  tokens (see :meth:`MokaKernelMeta.triton_plan`).
"""

from __future__ import annotations

import torch

from moka_kernels.torch_ops import group_tokens


class MokaKernelMeta:
    """Token -> slot grouping of the current step, shared by every MoKA layer."""

    def __init__(
        self,
        max_num_tokens: int,
        num_slots: int,
        device: torch.device | str,
        triton: bool | None = None,
    ) -> None:
        """``triton``: build the Triton kernel's plan (default: on CUDA) instead of CPU groups."""
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.triton = self.device.type == "cuda" if triton is None else triton
        self.token_slots = torch.full((max_num_tokens,), -1, dtype=torch.long, device=device)
        self.num_tokens = 0
        self._step_slots = self.token_slots[:0]
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.slots_present: frozenset[int] = frozenset()
        if self.triton:
            from moka_kernels.triton_ops import PREFILL_BLOCK_T, max_groups

            self.order = torch.zeros(max_num_tokens, dtype=torch.int32, device=device)
            self.sorted_slots = torch.full_like(self.token_slots, -1)
            self.decode_starts = torch.arange(max_num_tokens, dtype=torch.int32, device=device)
            self.prefill_starts = torch.full(
                (max_groups(max_num_tokens, PREFILL_BLOCK_T, num_slots),),
                max_num_tokens,
                dtype=torch.int32,
                device=device,
            )

    @torch.no_grad()
    def update(self, token_slots: torch.Tensor) -> None:
        """Take the step's token -> slot mapping (vLLM's ``token_lora_indices``)."""
        n = token_slots.shape[0]
        if n > self.token_slots.shape[0]:
            raise RuntimeError(f"{n} tokens exceed the {self.token_slots.shape[0]} preallocated")
        self.token_slots[:n].copy_(token_slots)
        self.token_slots[n:].fill_(-1)
        self.num_tokens = n
        self._step_slots = self.token_slots[:n]
        if self.triton:
            from moka_kernels.triton_ops import PREFILL_BLOCK_T, group_starts

            # One sort serves both forms: the decode form's starts are a fixed arange.
            order, sorted_slots, starts = group_starts(
                self.token_slots, PREFILL_BLOCK_T, self.num_slots
            )
            self.order.copy_(order)
            self.sorted_slots.copy_(sorted_slots)
            self.prefill_starts.copy_(starts)
        else:
            self.groups = group_tokens(self.token_slots[:n])
            self.slots_present = frozenset(slot for slot, _ in self.groups)

    def slots_for(self, num_tokens: int) -> torch.Tensor:
        """Slot of each of the layer's ``num_tokens`` rows (-1 past the step's tokens)."""
        if num_tokens == self.num_tokens:  # every layer of the step: one view, made once
            return self._step_slots
        return self.token_slots[:num_tokens]

    def groups_for(self, num_tokens: int) -> list[tuple[int, torch.Tensor]]:
        """CPU token groups for a layer of ``num_tokens`` rows."""
        if num_tokens >= self.num_tokens:
            return self.groups  # padded rows carry no adapter
        return group_tokens(self.token_slots[:num_tokens])  # not seen from vLLM; kept correct

    def triton_plan(self, num_tokens: int):
        """The Triton plan for a layer of ``num_tokens`` rows: prefixes of the step's buffers.

        Tokens are sorted by slot with -1 last, so the first ``num_tokens`` sorted positions hold
        every adapted token of the step; the decode form's starts are ``arange``, and the prefill
        form's first ``max_groups(num_tokens)`` starts include every group of adapted tokens. Only
        sizes choose the form, never data, so a captured graph stays valid.
        """
        from moka_kernels.triton_ops import (
            DECODE_BLOCK_T,
            TritonPlan,
            choose_block_t,
            max_groups,
        )

        block_t = choose_block_t(num_tokens, self.num_slots)
        if block_t == DECODE_BLOCK_T:
            starts = self.decode_starts[:num_tokens]
        else:
            starts = self.prefill_starts[: max_groups(num_tokens, block_t, self.num_slots)]
        return TritonPlan(self.order[:num_tokens], self.sorted_slots[:num_tokens], starts, block_t)
