"""MoKA adapters as vLLM ``LoRAModel``s: read ``peft_type``, load, validate and fold everything.

vLLM's loader (``LRUCacheWorkerLoRAManager._load_adapter``) runs when an adapter is added
(``--lora-modules``, ``/v1/load_lora_adapter``, a resolver, ``llm.llm_engine.add_lora``); an
exception raised there becomes an error response and the engine keeps serving. An exception in
``activate_adapter`` or in the forward pass kills the engine core. So every check happens here:
format, shapes against the base's real layer dims, finiteness after folding, and the preallocated
bank limits of every layer the adapter touches. Under tensor parallelism each rank's worker
loads the adapter and keeps its own exact part of every term (``moka_kernels.sharding``).
Activation then only copies tensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from vllm.lora.lora_model import LoRAModel

from moka_core import settings
from moka_core.adapter_check import (
    lora_shape_problem,
    moka_limit_problem,
    update_bound_problem,
    update_size_problem,
)
from moka_core.adapter_format import (
    CONFIG_NAME,
    PEFT_TYPE,
    config_kind,
    first_non_finite,
    load_adapter,
    read_config_json,
)
from moka_kernels import EntryShape, KronEntry
from moka_kernels.bank import SlotImage, entries_numel, slot_images

from .layers import MokaLayerMixin

SUPPORTED_PEFT_TYPES = ("MOKA", "LORA")


def read_peft_type(path: str | os.PathLike) -> str | None:
    """The adapter's kind (``adapter_format.config_kind``: no ``peft_type`` is a LoRA), or None
    when there is no config: vLLM's loader then gives its usual not-found error."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return None
    try:
        cfg = read_config_json(file)
    except ValueError as e:
        raise ValueError(f"adapter {str(path)!r}: {e}") from None
    return config_kind(cfg)


class MokaLoRAModel(LoRAModel):
    """A MoKA adapter (or, on CPU, a LoRA: :func:`lora_as_moka_model`) inside vLLM's LoRA
    machinery: no LoRA weights, the factors of the MoKA banks per layer.

    Being a ``LoRAModel`` is what lets vLLM's CPU LRU cache, slots, pinning and scheduler treat it
    like any LoRA. ``moka_images`` maps a vLLM module name (e.g. ``...self_attn.qkv_proj``) to
    that layer's entries, validated against the layer's bank and already in the form its slot
    holds (``moka_kernels.bank.SlotImage``), so activation only copies.
    """

    def __init__(self, lora_model_id: int, moka_images: dict[str, SlotImage]) -> None:
        super().__init__(lora_model_id, rank=1, loras={})
        self.moka_images = moka_images

    def clone(self, lora_model_id: int) -> MokaLoRAModel:
        return MokaLoRAModel(lora_model_id, dict(self.moka_images))


def moka_targets(manager) -> dict[str, tuple[str | None, int, int, int]]:
    """Adapter module path -> (vLLM module name, slice, out_features, in_features).

    Adapter paths are the checkpoint's (Hugging Face) names; vLLM packs some of them into one
    layer (``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj`` slices 0..2). Dims are the full
    layer's, whatever the tensor-parallel rank holds: adapters are written for the full model.
    Under pipeline parallelism the decoder layers of other stages are targets too, with module
    name None (nothing to write here), so every stage checks the whole adapter alike: a check
    failing on one stage only would leave the others waiting for it forever.

    Fixed once the layers are built, so computed once per manager (every load reads it).
    """
    cached = getattr(manager, "_moka_targets", None)
    if cached is not None:
        return cached
    out: dict[str, tuple[str | None, int, int, int]] = {}
    for name, module in manager.modules.items():
        if not isinstance(module, MokaLayerMixin):
            continue
        widths = module.moka_shard.slice_widths
        in_features = module.moka_shard.in_features
        packed = manager.packed_modules.get(name)
        if packed and len(packed) == len(widths):
            for i, sub in enumerate(packed):
                out[sub] = (name, i, widths[i], in_features)
        else:
            out[name] = (name, 0, sum(widths), in_features)
    manager._moka_targets = out | _other_stage_targets(manager.model, out)
    return manager._moka_targets


_LAYER_PATH = re.compile(r"^(?P<stack>.+\.)(?P<index>\d+)\.(?P<rest>.+)$")


def _other_stage_targets(model, present: dict) -> dict[str, tuple[None, int, int, int]]:
    """Targets in decoder layers another pipeline stage holds (``PPMissingLayer`` here),
    shaped like the same module of a layer this stage holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    by_stack: dict[str, dict[str, tuple[int, int, int]]] = {}
    for path, (_, slice_idx, out_f, in_f) in present.items():
        m = _LAYER_PATH.match(path)
        if m:
            by_stack.setdefault(m["stack"], {})[m["rest"]] = (slice_idx, out_f, in_f)
    out: dict[str, tuple[None, int, int, int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, PPMissingLayer):
            continue
        stack, _, index = name.rpartition(".")
        if not index.isdigit():
            continue  # a missing embedding or head, not a decoder layer
        for rest, dims in by_stack.get(stack + ".", {}).items():
            out[f"{name}.{rest}"] = (None, *dims)
    return out


def filtered_out_problem(manager, module_path: str) -> str | None:
    """Why ``module_path`` (or a bare target such as ``o_proj``) gets no adapter on this engine
    when vLLM's deployment filter (``--lora-target-modules``, ``LoRAConfig.target_modules``)
    left its layer unwrapped, else None. vLLM itself would drop such a module's weights and
    serve the rest of the adapter: a different model than the one trained, without a word."""
    from vllm.lora.utils import is_in_target_modules

    allowed = manager.lora_config.target_modules
    if allowed is None or is_in_target_modules(
        module_path, allowed, manager.packed_modules_mapping
    ):
        return None
    return (
        f"{module_path!r} is not adapted on this engine: it was started with "
        f"--lora-target-modules {' '.join(allowed)}; restart it with "
        f"{module_path.rsplit('.', 1)[-1]!r} in that list (or without the option) to serve "
        "this adapter"
    )


def load_moka_model(manager, lora_request, path: str) -> MokaLoRAModel:
    """Load, validate and fold a MoKA adapter folder for this engine's layers."""
    where = f"MoKA adapter {lora_request.lora_name!r} ({path})"
    targets = moka_targets(manager)
    base_dims: dict[str, tuple[int, int]] = {}
    for sub, (_, _, out_f, in_f) in targets.items():
        base_dims.setdefault(sub.rsplit(".", 1)[-1], (out_f, in_f))
    # Say why a target has no layer here (one check per target: the filter goes by the module
    # name's suffix, so a target it admits has every module path admitted too).
    if manager.lora_config.target_modules is not None:
        cfg = read_config_json(Path(path) / CONFIG_NAME)
        for target in cfg.get("target_modules") or ():
            if isinstance(target, str) and target not in base_dims:
                if problem := filtered_out_problem(manager, target):
                    raise ValueError(f"{where}: {problem}")
    adapter = load_adapter(path, base_dims=base_dims)

    # Every check below covers the whole adapter, on every rank and stage alike: a check that
    # failed on one worker only would leave the others waiting for it (tensor and pipeline
    # parallelism). Writing then touches this worker's layers only.
    limits_checked: set[str | None] = set()  # every module of a target has its shapes
    for module_path, w in adapter.modules.items():
        if module_path not in targets:
            raise ValueError(
                f"{where}: module {module_path!r} does not exist in this base model (or is not "
                "a linear layer vLLM can adapt)"
            )
        target = adapter.config.target_for(module_path)
        if target not in limits_checked:
            if problem := moka_limit_problem(module_path, w.A, w.B):
                raise ValueError(f"{where}: {problem}")
            limits_checked.add(target)
    dtype = manager.lora_config.lora_dtype
    groups = adapter.fold_groups(dtype=torch.float64)
    if not groups:
        raise ValueError(f"{where}: the adapter has no modules")
    for group in groups:
        for module_path, bound in zip(group.paths, group.update_bounds().tolist(), strict=True):
            if problem := update_bound_problem(module_path, bound, dtype):
                raise ValueError(f"{where}: {problem}")
    terms: list[tuple[str | None, KronEntry]] = []
    for group in groups:
        slices = {p: targets[p][1] for p in group.paths}
        try:
            entries = group.kron_entries(dtype, slices)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for module_path in group.paths:
            layer_name = targets[module_path][0]
            terms.extend((layer_name, e) for e in entries[module_path])
    return model_from_terms(manager, lora_request.lora_int_id, terms, where)


def model_from_terms(
    manager,
    adapter_id: int,
    terms: list[tuple[str | None, KronEntry]],
    where: str,
    *,
    within_slot: bool = False,
) -> MokaLoRAModel:
    """The :class:`MokaLoRAModel` of whole terms (vLLM module name, entry), each cut to this
    rank's part, checked against every layer's bank and admitted into its pool (all or none),
    then packed into slot images. ``ValueError`` when a bank refuses them, or with
    ``within_slot`` when a layer's part is over one slot's share of its pool (then it can never
    crowd out the adapters the pool was sized for)."""
    by_layer: dict[str, list[KronEntry]] = {}
    for layer_name, term in terms:
        if layer_name is None:  # held by another pipeline stage, which writes it
            continue
        # This tensor-parallel rank's part of the term (the term itself at TP=1).
        shard = manager.modules[layer_name].moka_shard
        pieces = [term] if shard.is_whole else shard.shard(term)
        by_layer.setdefault(layer_name, []).extend(pieces)
    shapes: dict[str, list[EntryShape]] = {}
    for layer_name, entries in by_layer.items():
        bank = manager.modules[layer_name].moka_bank
        try:
            shapes[layer_name] = bank.check_entries(entries)
        except ValueError as e:
            raise ValueError(
                f"{where}: layer {layer_name!r}: {e} (bank limits: MOKA_MAX_COMPONENTS, "
                "MOKA_MAX_FACTOR_NUMEL, MOKA_SLOT_NUMEL)"
            ) from None
    if within_slot:
        for layer_name, layer_shapes in shapes.items():
            bank = manager.modules[layer_name].moka_bank
            if entries_numel(layer_shapes) > bank.pool_numel // bank.num_slots:
                raise ValueError(f"{where}: layer {layer_name!r}: over one slot's share")
    admit_moka_model(manager, adapter_id, by_layer, shapes, terms, where)
    layers = [(manager.modules[n].moka_bank, entries, shapes[n]) for n, entries in by_layer.items()]
    images = dict(zip(by_layer, slot_images(layers), strict=True))
    return MokaLoRAModel(adapter_id, images)


def lora_as_moka_model(manager, lora: LoRAModel, where: str) -> MokaLoRAModel | None:
    """On CPU, a checked LoRA as a :class:`MokaLoRAModel`: each module one low-rank entry
    ``U = scaling * lora_B`` ``(out, r)``, ``V = lora_A`` ``(r, in)``, served by the same op and
    C++ kernel as MoKA adapters (a rank-8 LoRA costs about a tenth of vLLM's CPU LoRA ops per
    layer: docs/benchmarks.md), so a CPU engine's steps skip vLLM's LoRA path.

    None keeps vLLM's path: on other devices (its kernels there), with ``MOKA_CPU_LORA=0``, for
    a LoRA with weights outside the adapted linear layers (embeddings, ``lm_head``, modules to
    save) and for one over a slot's share of a layer's MoKA pool (``MOKA_SLOT_NUMEL``)."""
    if manager.device.type != "cpu" or not settings.get("MOKA_CPU_LORA") or lora.modules_to_save:
        return None
    targets = moka_targets(manager)
    dtype = manager.lora_config.lora_dtype
    terms: list[tuple[str | None, KronEntry]] = []
    for module, w in lora.loras.items():
        a, b = w.lora_a, w.lora_b
        if module not in targets or not all(isinstance(t, torch.Tensor) for t in (a, b)):
            return None  # embeddings, lm_head, a module without both factors: vLLM's rules
        layer_name, slice_index, _, _ = targets[module]
        u = (b.double() * float(w.scaling)).to(dtype)  # vLLM folds the scaling into B too
        if not bool(torch.isfinite(u).all()):
            raise ValueError(f"{where}: module {module!r}: scaling * lora_B overflows {dtype}")
        term = KronEntry(b=a.to(dtype), a=u, slice=slice_index, rank=a.shape[0])
        terms.append((layer_name, term))
    if not terms:
        return None
    try:
        return model_from_terms(manager, lora.id, terms, where, within_slot=True)
    except ValueError:
        return None  # over the MoKA banks' limits or a slot's share: vLLM's buffers hold it


def admit_moka_model(manager, adapter_id, by_layer, shapes, terms, where: str) -> None:
    """Admit the adapter into every layer's pool (``moka_kernels.bank``), all or none.

    At TP=1 a layer's size is what its entries take. Under tensor parallelism each rank's
    pieces differ a little, and a check failing on one rank only must not happen, so every
    rank admits the same bound: each whole term times the pieces one component can become.
    """
    sizes: dict[str, int] = {}
    for layer_name in by_layer:
        if manager.modules[layer_name].moka_shard.is_whole:
            sizes[layer_name] = entries_numel(shapes[layer_name])
    for layer_name, term in terms:
        if layer_name is None or manager.modules[layer_name].moka_shard.is_whole:
            continue
        pieces = manager.modules[layer_name].moka_shard.max_pieces(term.slice)
        numel = (0 if term.a is None else term.a.numel()) + term.b.numel()
        sizes[layer_name] = sizes.get(layer_name, 0) + pieces * numel
    for layer_name, numel in sizes.items():
        if problem := manager.modules[layer_name].moka_bank.admission_problem(adapter_id, numel):
            raise ValueError(f"{where}: layer {layer_name!r}: {problem} (MOKA_SLOT_NUMEL)")
    for layer_name, numel in sizes.items():
        manager.modules[layer_name].moka_bank.admit(adapter_id, numel)


def check_lora_model(manager, lora: LoRAModel, where: str) -> None:
    """What vLLM's LoRA loader leaves unchecked, checked before the adapter can reach a slot.

    vLLM checks the rank and the module names; a LoRA with NaN weights was served (empty text,
    unserialisable logprobs), and one written for another base's dims failed only when copied
    into a slot, inside the engine step, killing the engine. Shapes are checked against the
    full layer (every rank alike, see ``load_moka_model``).
    """
    named = {
        f"{module!r}: {name}": t
        for module, w in lora.loras.items()
        for name, t in (("lora_A", w.lora_a), ("lora_B", w.lora_b))
        if isinstance(t, torch.Tensor)
    }
    bad = first_non_finite(named)
    if bad is not None:
        raise ValueError(f"{where}: {bad} has non-finite values (NaN or Inf)")
    dtype = manager.lora_config.lora_dtype
    for module, w in lora.loras.items():
        a, b, scaling = w.lora_a, w.lora_b, getattr(w, "scaling", 1.0)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            scaled = b.double() * float(scaling if isinstance(scaling, (int, float)) else 1.0)
            if problem := update_size_problem(module, [(scaled, a)], dtype):
                raise ValueError(f"{where}: {problem}")
    targets = moka_targets(manager)
    for module, weights in lora.loras.items():
        a, b = weights.lora_a, weights.lora_b
        if module not in targets:
            if problem := filtered_out_problem(manager, module):
                raise ValueError(f"{where}: {problem}")
            continue  # embeddings, lm_head: vLLM's own rules
        _, _, out_f, in_f = targets[module]
        a_shape = None if a is None else tuple(a.shape)
        b_shape = None if b is None else tuple(b.shape)
        rank = getattr(weights, "rank", None)  # vLLM's, from r / rank_pattern
        if problem := lora_shape_problem(module, a_shape, b_shape, out_f, in_f, rank):
            raise ValueError(f"{where}: {problem}")


def check_peft_type(peft_type: str | None, path: str) -> None:
    if peft_type is not None and peft_type not in SUPPORTED_PEFT_TYPES:
        raise ValueError(
            f"adapter at {path!r}: unsupported peft_type {peft_type!r}; this server serves "
            f"{PEFT_TYPE} and LORA adapters"
        )
