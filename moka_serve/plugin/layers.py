"""MoKA layers: vLLM's LoRA linear layers plus a per-slot :class:`moka_kernels.MokaBank`.

Each class subclasses one of vLLM's LoRA wrappers and keeps its behaviour (LoRA buffers, vLLM's
dummy-LoRA warm-up, ``set_lora``), so LoRA and MoKA adapters share the same slots. The bank is
preallocated in ``create_lora_weights`` and written in place, so nothing is reallocated when
adapters are swapped (what CUDA graphs need). ``_apply_lora_to_output`` hands all adapter work
of the layer (vLLM's LoRA delta, then the MoKA delta) to one opaque custom op,
``moka_serve::adapters``, so a compiled forward traces one call per layer and the per-step
host-side state is read inside it, eagerly (``docs/serving.md``, "Compiled forward"); tokens of
slot -1 (no adapter) are never touched. The embedding LoRA layer runs its LoRA part in the same
op, and the lm_head LoRA is skipped on CPU when no present slot holds lm_head weights.

Bank sizes are engine-start options read from the environment (``moka_core.limits``) when the
layers are built:

* ``MOKA_MAX_COMPONENTS`` (default 4): Kronecker components per adapted module (per output
  slice of a fused layer: q, k and v of ``qkv_proj`` each get this many; a module's rank-1
  components are one low-rank entry and count as one).
* ``MOKA_MAX_FACTOR_NUMEL`` (default 4096): elements of one A or B factor (capped per layer at
  what a factor of that layer can have, so small models do not over-allocate).

An adapter over these limits is rejected when it is loaded, never at activation time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import Library
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.lora.layers.column_parallel_linear import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
)
from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA
from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA
from vllm.utils.torch_utils import direct_register_custom_op

from moka_core.limits import bank_limits, moka_only_engine, slot_numel
from moka_kernels import MokaBank, cpu_kernel
from moka_kernels.bank import SlotImage
from moka_kernels.sharding import LayerShard, Run
from moka_kernels.torch_ops import moka_apply_torch

from .kernel_metadata import MokaKernelMeta


class AdapterLayerMixin:
    """What every adapter layer of the plugin shares (mixed in before the vLLM class).

    * ``moka_meta``: the step's token grouping (set by the model manager), read inside the op.
    * ``moka_layer_name``: key in ``compilation_config.static_forward_context`` (set by the
      manager); the custom op finds the layer there at run time. None: not registered, the
      layer runs its adapter code directly.
    * ``_lora_slots``: slots whose LoRA buffers may be non-zero in this layer (``set_lora``
      adds a slot, ``reset_lora`` removes it after zeroing; vLLM creates the buffers zeroed).
      So the CPU path can skip vLLM's LoRA ops when no token of a step needs them: MoKA and empty slots hold zero LoRA weights, for which those ops would only add
      zeros at the cost of the whole LoRA path (on CUDA the ops always run: they may be
      captured in a graph). And ``reset_lora`` skips slots that are zero already: vLLM resets
      every layer's slot on each activation, and zeroing the LoRA buffers of 120 layers was a
      fifth of a MoKA adapter's cold load.
    * ``moka_only`` (``MOKA_ONLY``, read when the layer is built): no slot ever holds LoRA
      weights, so vLLM's LoRA buffers are views of one zero element (``shared_zero_buffers``),
      vLLM's LoRA ops never run and ``set_lora`` writes nothing (vLLM's warm-up still "sets"
      dummy LoRAs; real ones are refused by the loader).
    """

    moka_meta: MokaKernelMeta
    moka_layer_name: str | None = None
    moka_only: bool = False
    _lora_slots: set[int]

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        self.moka_only = moka_only_engine()
        # MoKA-only: vLLM builds one slot's buffers (its shapes and attributes), which are then
        # swapped for zero views with all max_loras slots.
        super().create_lora_weights(1 if self.moka_only else max_loras, lora_config, model_config)
        if self.moka_only:
            shared_zero_buffers(self, max_loras)
        self._lora_slots = set()

    def set_lora(self, index: int, *args, **kwargs) -> None:
        if self.moka_only:
            return
        try:
            super().set_lora(index, *args, **kwargs)
        finally:  # after vLLM's set_lora, which starts with reset_lora; also if it fails halfway
            self._lora_slots.add(index)

    def reset_lora(self, index: int) -> None:
        if not self.moka_only and index in self._lora_slots:
            super().reset_lora(index)
        self._lora_slots.discard(index)

    def lora_needed(self, device: torch.device) -> bool:
        """Whether vLLM's LoRA ops must run for this step's tokens."""
        if self.moka_only:
            return False
        return device.type != "cpu" or not self._lora_slots.isdisjoint(self.moka_meta.slots_present)

    def run_adapters(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """All adapter work of the layer as one opaque op when vLLM runs the model.

        Inside a forward context (the engine, compiled or not) this calls
        ``torch.ops.moka_serve.adapters``, which looks the layer up by name and runs
        :meth:`apply_adapters` eagerly, so Dynamo traces one call with no data-dependent Python
        in it. Outside one (tests, tower modules) it runs the same code directly.
        """
        if self.moka_layer_name is not None and is_forward_context_available():
            torch.ops.moka_serve.adapters(x, output, self.moka_layer_name)
        else:
            self.apply_adapters(x, output)

    def apply_adapters(self, x: torch.Tensor, output: torch.Tensor) -> None:
        raise NotImplementedError


class MokaLayerMixin(AdapterLayerMixin):
    """Adds the MoKA bank to a vLLM LoRA linear layer (mixed in before the vLLM class)."""

    moka_bank: MokaBank
    moka_shard: LayerShard

    def moka_layer_shard(self) -> LayerShard:
        """This rank's rows and columns of the full layer (column-parallel, one slice).

        A ``ColumnParallelLinear`` rank holds one run of rows; a ``MergedColumnParallelLinear``
        adapted as one checkpoint module holds one run of each half, as vLLM's own
        ``slice_lora_b`` cuts LoRA B.
        """
        base = self.base_layer
        full, local, rank = int(base.output_size), int(self.output_size), self.tp_rank
        if getattr(self, "is_merged_col_linear", False):  # adjacent halves at TP=1
            half = local // 2
            rows = ((rank * half, half), (full // 2 + rank * half, half))
        else:
            rows = ((rank * local, local),)
        return LayerShard(int(self.input_size), (full,), (rows,), (0, int(self.input_size)))

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        max_components, max_numel = bank_limits()
        shard = self.moka_layer_shard()
        widths = shard.local_slice_widths
        in_features = shard.local_in_features
        if sum(widths) != int(self.output_size):
            raise RuntimeError(
                f"moka-serve: this rank's slices {widths} do not add up to the layer's "
                f"{self.output_size} outputs"
            )
        # No factor of a slice can have more elements than the slice's dense matrix (in the
        # full layer's coordinates: a rank's piece of a factor is never bigger than the factor).
        cap = min(max_numel, max(shard.slice_widths) * shard.in_features)
        # Under tensor parallelism one component becomes up to 3 entries per run of rows or
        # columns a rank holds (moka_kernels.sharding); the limit users see stays per component.
        max_entries = max_components * sum(shard.max_pieces(i) for i in range(len(widths)))
        kind = str(getattr(self.base_layer, "prefix", "")).rsplit(".", 1)[-1]
        per_slot = slot_numel(kind, default=max_entries * 2 * cap)
        device = self.lora_a_stacked[0].device
        # On CPU the torch path's packed copy is the only storage (it grows with the adapters
        # held); elsewhere the kernels read a preallocated pool.
        self.moka_bank = MokaBank(
            num_slots=max_loras,
            max_entries=max_entries,
            max_a_numel=cap,
            max_b_numel=cap,
            in_features=in_features,
            out_features=sum(widths),
            dtype=self.lora_a_stacked[0].dtype,
            device=device,
            slice_widths=widths,
            pool_numel=max_loras * per_slot,
            pooled=device.type != "cpu",
        )
        self.moka_shard = shard
        self._cpp_bank = cpu_kernel.bank_supported(self.moka_bank)
        self._cpu_call: cpu_kernel.LayerCall | bool | None = None

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.reset_moka(index)

    def reset_moka(self, index: int) -> None:
        if self.moka_bank.entries[index]:
            self.moka_bank.clear_slot(index)

    def set_moka(self, index: int, image: SlotImage) -> None:
        """Copy one adapter's entries for this layer into slot ``index`` (validated and packed
        at load time: ``moka_kernels.bank.slot_images``)."""
        self.moka_bank.write_image(index, image)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.run_adapters(x, output)
        return output

    def apply_adapters(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Add the LoRA and MoKA deltas of this step's tokens into ``output`` in place.

        Runs eagerly with the step's host-side state: the grouping in :attr:`moka_meta` and the
        punica wrapper's ``is_prefill``/``no_lora``. Rows past the step's tokens (padding) get
        no adapter.
        """
        meta = self.moka_meta
        if x.is_cuda:
            # No host-side shortcuts: the op may be captured in a CUDA graph, so both kernels
            # always run; the MoKA kernel skips empty slots and tokens of slot -1 itself.
            if not self.moka_only:
                self._apply_vllm_lora(x, output)
            apply_moka_cuda(x, output, meta, self.moka_bank)
            return
        # CPU: every shortcut is host-side and cheap; this runs ~4 times per decoder layer and
        # step, adapted or not, so base-only steps and layers no present adapter touches return
        # before any tensor op.
        present = meta.slots_present
        if not present:
            return
        if self.lora_needed(x.device):
            self._apply_vllm_lora(x, output)
        bank = self.moka_bank
        if bank.occupied.isdisjoint(present):
            return
        call = self._cpu_call
        if call is None or (call and call.token_slots is not meta.token_slots):
            call = self._cpu_call = self._new_cpu_call()
        if call and call(x, output):  # the C++ kernel, arguments read once (LayerCall)
            return
        x2, y2 = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
        n = x2.shape[0]
        if self._cpp_bank and cpu_kernel.loaded() and cpu_kernel.takes(n):
            cpu_kernel.run(x2, y2, meta.slots_for(n), bank)
        else:
            moka_apply_torch(x2, y2, meta.slots_for(n), bank, groups=meta.groups_for(n))

    def _new_cpu_call(self) -> cpu_kernel.LayerCall | bool:
        """The kernel's call for this layer and the step's slot buffer; False when it cannot
        read the bank (the calls below it then decide per batch)."""
        try:
            return cpu_kernel.LayerCall(self.moka_bank, self.moka_meta.token_slots)
        except ValueError:
            return False

    def _apply_vllm_lora(self, x: torch.Tensor, output: torch.Tensor) -> None:
        result = super()._apply_lora_to_output(x, output)
        if result.data_ptr() != output.data_ptr():  # platforms that cannot update in place
            output.copy_(result.view_as(output))


def apply_moka_cuda(
    x: torch.Tensor, output: torch.Tensor, meta: MokaKernelMeta, bank: MokaBank
) -> None:
    """The MoKA half of the adapter op on CUDA: the step's Triton plan, then one kernel launch.

    It runs inside CUDA-graph capture, so it must never read device data on the host (no
    ``.item()``, ``.tolist()`` or branch on a tensor): sizes alone pick the plan.
    ``tests/test_cuda_trace.py`` traces it with fake CUDA tensors and ``fullgraph=True`` on CPU,
    so a data-dependent branch or a host sync fails CI before a GPU sees it.
    """
    from moka_kernels.triton_ops import moka_apply_triton

    x2, y2 = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
    n = x2.shape[0]
    moka_apply_triton(x2, y2, meta.slots_for(n), bank, plan=meta.triton_plan(n))


_LORA_BUFFERS = ("lora_a_stacked", "lora_b_stacked")


def lora_buffers(layer) -> list[torch.Tensor]:
    """vLLM's LoRA A and B buffers of ``layer`` (each one tensor, or a tuple of one per slice)."""
    out: list[torch.Tensor] = []
    for name in _LORA_BUFFERS:
        value = getattr(layer, name, None)
        out += [value] if isinstance(value, torch.Tensor) else list(value or ())
    return out


def shared_zero_buffers(layer, max_loras: int) -> None:
    """Replace the layer's one-slot LoRA buffers by zero views with ``max_loras`` slots.

    Every view has stride 0 over one zero element: the shapes, dtype and device vLLM reads
    (``create_dummy_lora``, the bank's sizing) stay, the memory does not. Any write into them
    fails loudly (overlapping memory), and none is made: MoKA-only layers skip vLLM's LoRA
    writes and ops.
    """

    def zero_view(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros((), dtype=t.dtype, device=t.device).expand(shape)

    for name in _LORA_BUFFERS:
        value = getattr(layer, name)
        if isinstance(value, torch.Tensor):
            setattr(layer, name, zero_view(value, (max_loras, *value.shape[1:])))
        else:
            setattr(layer, name, tuple(zero_view(t, (max_loras, *t.shape[1:])) for t in value))
    flat = getattr(layer, "lora_a_stacked_2d", None)  # the embedding's (slots x vocab, rank)
    if isinstance(flat, torch.Tensor):
        layer.lora_a_stacked_2d = zero_view(flat, (max_loras * flat.shape[0], flat.shape[1]))


def _adapters_op(x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.apply_adapters(x, output)


def _adapters_op_fake(x: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


# ``moka_serve::adapters(x, output, layer_name)``: mutates ``output``. Registered once per
# process, like vLLM's own ``lora_linear_async`` (``vllm/lora/layers/base_linear.py``).
_LIBRARY = Library("moka_serve", "FRAGMENT")
direct_register_custom_op(
    op_name="adapters",
    op_func=_adapters_op,
    mutates_args=["output"],
    fake_impl=_adapters_op_fake,
    target_lib=_LIBRARY,
)


class MokaColumnParallelLinearWithLoRA(MokaLayerMixin, ColumnParallelLinearWithLoRA):
    """Column-parallel linear (one output slice)."""


class MokaMergedColumnParallelLinearWithLoRA(MokaLayerMixin, MergedColumnParallelLinearWithLoRA):
    """Merged column (e.g. ``gate_up_proj``): one slice per packed sub-module, each cut into
    ``tp_size`` equal runs of rows."""

    def moka_layer_shard(self) -> LayerShard:
        rows = tuple(
            ((int(i) * int(w), int(w)),)
            for i, w in zip(self.output_ids, self.output_slices, strict=True)
        )
        in_f = int(self.input_size)
        return LayerShard(in_f, tuple(int(w) for w in self.output_sizes), rows, (0, in_f))


def _qkv_runs(layer) -> tuple[tuple[int, int, int], tuple[Run, Run, Run]]:
    """Full q/k/v widths and this rank's run of each, as ``QKVParallelLinear`` shards them:
    query heads split evenly; key/value heads split, or replicated when ``tp > kv heads``
    (rank r then holds kv head ``r // num_kv_head_replicas``)."""
    base = layer.base_layer
    q_local = base.num_heads * base.head_size
    k_local = base.num_kv_heads * base.head_size
    v_local = base.num_kv_heads * base.v_head_size
    kv_id = layer.tp_rank // base.num_kv_head_replicas
    full = (
        base.total_num_heads * base.head_size,
        base.total_num_kv_heads * base.head_size,
        base.total_num_kv_heads * base.v_head_size,
    )
    runs = (
        (layer.tp_rank * q_local, q_local),
        (kv_id * k_local, k_local),
        (kv_id * v_local, v_local),
    )
    return full, runs


class MokaQKVParallelLinearWithLoRA(MokaLayerMixin, QKVParallelLinearWithLoRA):
    """Fused qkv checkpoint module adapted as a whole (one slice: a q, a k and a v run)."""

    def moka_layer_shard(self) -> LayerShard:
        (q, k, v), runs = _qkv_runs(self)
        offsets = (0, q, q + k)
        rows = tuple(
            (off + start, length) for off, (start, length) in zip(offsets, runs, strict=True)
        )
        in_f = int(self.input_size)
        return LayerShard(in_f, (q + k + v,), (rows,), (0, in_f))


class MokaMergedQKVParallelLinearWithLoRA(MokaLayerMixin, MergedQKVParallelLinearWithLoRA):
    """q/k/v packed into ``qkv_proj``: three slices, k and v narrower under GQA."""

    def moka_layer_shard(self) -> LayerShard:
        full, runs = _qkv_runs(self)
        in_f = int(self.input_size)
        return LayerShard(in_f, full, tuple((run,) for run in runs), (0, in_f))


class MokaRowParallelLinearWithLoRA(MokaLayerMixin, RowParallelLinearWithLoRA):
    """Row-parallel linear (e.g. ``o_proj``, ``down_proj``): each rank reads one run of the
    input columns; vLLM's all-reduce after the layer adds the ranks' deltas."""

    def moka_layer_shard(self) -> LayerShard:
        local = int(self.input_size)
        full_in = int(self.base_layer.input_size)
        out = int(self.output_size)
        return LayerShard(full_in, (out,), (((0, out),),), (self.tp_rank * local, local))


class MokaVocabParallelEmbeddingWithLoRA(AdapterLayerMixin, VocabParallelEmbeddingWithLoRA):
    """vLLM's embedding LoRA with its LoRA part in the op (MoKA does not adapt embeddings).

    The embedding lies inside the compiled model, and vLLM's CPU ``add_lora_embedding``
    branches on per-step state (``is_prefill``, ``no_lora``, batch sizes): traced once, those
    would be baked in for every later step. In the op they are read each step, and skipped
    when no token's slot holds embedding LoRA weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer.forward(x)
        self.run_adapters(x, output)
        return output

    def apply_adapters(self, x: torch.Tensor, output: torch.Tensor) -> None:
        if not self.lora_needed(output.device):
            return
        num_tokens = x.shape[0]
        indices = self.punica_wrapper._embeddings_indices[:num_tokens]
        lora_a = F.embedding(x + indices, self.lora_a_stacked_2d)
        out2 = output.view(-1, output.shape[-1]) if output.ndim == 3 else output
        lora_a = lora_a.view(-1, lora_a.shape[-1]) if lora_a.ndim == 3 else lora_a
        result = self.punica_wrapper.add_lora_embedding(
            out2, lora_a, self.lora_b_stacked, add_input=True
        )
        if result is not None and result.data_ptr() != out2.data_ptr():
            out2.copy_(result.view_as(out2))


class MokaLogitsProcessorWithLoRA(AdapterLayerMixin, LogitsProcessorWithLoRA):
    """vLLM's lm_head LoRA, skipped on CPU when no token's slot holds lm_head LoRA weights.

    It runs eagerly (outside the compiled model) and costs every request: on SmolLM2 its
    gathers of a (vocab x rank) factor per token take ~15 ms of a ~110 ms decode step, for
    adapters that have no lm_head weights at all.
    """

    def _get_logits(self, hidden_states, lm_head, embedding_bias=None, skip_gather=False):
        if self.lora_needed(hidden_states.device):
            return super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
        # vLLM 0.32's LogitsProcessorWithLoRA._get_logits without add_lora_logits.
        if skip_gather:
            raise NotImplementedError(
                "Skipping the logits TP gather is not supported with an lm_head LoRA."
            )
        head = lm_head.base_layer if hasattr(lm_head, "base_layer") else lm_head
        logits = self.base_layer._apply_head(head, hidden_states, embedding_bias)
        logits = self.base_layer._gather_logits(logits)
        if logits is None:
            return None
        if self.sharded_to_full_mapping_gpu is not None:
            logits = logits[:, self.sharded_to_full_mapping_gpu]
        return logits[:, : self.base_layer.vocab_size]


# vLLM class -> MoKA class, replaced position for position in ``_all_lora_classes`` so vLLM's
# matching order is unchanged.
REPLACEMENTS: dict[type, type] = {
    ColumnParallelLinearWithLoRA: MokaColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA: MokaMergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA: MokaQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA: MokaMergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA: MokaRowParallelLinearWithLoRA,
    VocabParallelEmbeddingWithLoRA: MokaVocabParallelEmbeddingWithLoRA,
}


def from_layer_logits_processor(layer, lm_head, max_loras, lora_config, model_config=None):
    """``vllm.lora.utils.from_layer_logits_processor`` building :class:`MokaLogitsProcessorWithLoRA`."""
    ret = MokaLogitsProcessorWithLoRA(
        layer,
        lm_head.embedding_dim,
        lm_head.weight.dtype,
        lm_head.weight.device,
        lm_head.get_sharded_to_full_mapping(),
    )
    ret.create_lora_weights(max_loras, lora_config, model_config)
    return ret


def install() -> None:
    """Swap the MoKA classes into ``vllm.lora.utils._all_lora_classes`` and the logits
    processor's factory used by ``vllm.lora.model_manager`` (idempotent)."""
    from vllm.lora import model_manager
    from vllm.lora import utils as lora_utils

    lora_utils._all_lora_classes = tuple(
        REPLACEMENTS.get(cls, cls) for cls in lora_utils._all_lora_classes
    )
    model_manager.from_layer_logits_processor = from_layer_logits_processor
