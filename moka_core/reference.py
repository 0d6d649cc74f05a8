"""Ground truth for serving tests: a transformers model with an adapter merged into its weights.

vLLM computes ``W x + delta(x)`` with its own kernels; the reference here instead forms
``W + delta_W`` densely (in float64, then cast) and runs plain transformers. If the served tokens
equal ``greedy_generate`` on this model, the serving path computes the adapter right.

4-bit bases: a bitsandbytes ``Linear4bit`` that an adapter targets is dequantized and replaced by
a plain ``nn.Linear`` holding ``dequant(W_nf4) + delta_W`` ("merged into dequantized weights").
That equals ``W_nf4 x + delta_W x``, which is what a server computes with the base weight kept in
4 bits and the adapter applied beside it; re-quantizing the merged weight would not. Untargeted
layers stay 4-bit.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from moka_core.adapter_format import (
    PEFT_PREFIX,
    MokaAdapter,
    adapter_kind,
    config_kind,
    load_adapter,
    read_config_json,
)
from moka_core.bnb_cpu import keep_portable_4bit_layout

LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)(?:\.[^.]+)?\.weight$")


# --------------------------------------------------------------------------- merging


def _is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (checked first: Linear4bit subclasses nn.Linear).

    bitsandbytes is not imported here: if it is not loaded, no module can be one of its layers.
    """
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def _get_linear(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``; ValueError if absent or not a (4-bit) linear layer."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"module {path!r} does not exist in {type(model).__name__}") from None
    if not (isinstance(module, nn.Linear) or _is_linear4bit(module)):
        raise ValueError(f"module {path!r} is a {type(module).__name__}, not a linear layer")
    return module


def _dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a bitsandbytes Linear4bit computes with, shape (out, in)."""
    from bitsandbytes.functional import dequantize_4bit

    weight = module.weight
    w = dequantize_4bit(weight.data, weight.quant_state)
    return w.reshape(module.out_features, module.in_features)


def _merge_delta(model: nn.Module, path: str, delta: torch.Tensor) -> None:
    """Add the float64 ``delta`` (out, in, checked by ``_merge_all``) to the weight at ``path``.

    A new Parameter is assigned rather than writing into the old one, so that a weight tied to
    another (``lm_head`` and ``embed_tokens``) is untied instead of changing both.
    """
    module = _get_linear(model, path)
    if _is_linear4bit(module):
        base = _dequantized_weight(module)
        dtype = module.weight.quant_state.dtype or base.dtype
    else:
        base, dtype = module.weight.data, module.weight.dtype
    merged = (base.to(torch.float64) + delta.to(base.device, torch.float64)).to(dtype)
    if _is_linear4bit(module):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.to(device=base.device, dtype=dtype)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        model.set_submodule(path, linear)
    else:
        module.weight = nn.Parameter(merged, requires_grad=module.weight.requires_grad)


def merge_moka_into_model(model: nn.Module, adapter: MokaAdapter) -> None:
    """Add each module's dense MoKA update (computed in float64) into ``model``'s weights.

    Paths in ``adapter.modules`` are relative to the causal-LM object (``model.layers.0...``).
    All paths and shapes are checked before any weight changes, so a bad adapter leaves the
    model untouched. 4-bit targets are merged into dequantized weights (see module doc).
    """
    deltas = {path: adapter.delta_weight(path, torch.float64) for path in adapter.modules}
    _merge_all(model, deltas)


def _merge_all(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Validate every target first, then merge: all-or-nothing."""
    for path, delta in deltas.items():
        module = _get_linear(model, path)
        shape = (module.out_features, module.in_features)
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"module {path!r}: adapter delta has shape {list(delta.shape)}, "
                f"the layer's weight {list(shape)}"
            )
    for path, delta in deltas.items():
        _merge_delta(model, path, delta)


# --------------------------------------------------------------------------- LoRA


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets_module(target_modules, module: str) -> bool:
    """PEFT's target rule: a regex string must fully match; a list matches the last name(s)."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _read_lora(lora_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT LoRA folder, rejecting features this reference can't merge."""
    folder = Path(lora_dir)
    cfg = read_config_json(folder / LORA_CONFIG_NAME)
    if config_kind(cfg) != "LORA":
        raise ValueError(f"{folder}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"{folder}: {flag}=true is not supported by the reference merge")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{folder}: modules_to_save is not supported by the reference merge")
    return cfg, load_file(folder / LORA_WEIGHTS_NAME)


def lora_deltas(lora_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Module path -> dense float64 update ``scale * B @ A`` of a PEFT LoRA folder.

    ``scale`` is ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)``, with
    ``rank_pattern``/``alpha_pattern`` applied per module as PEFT does.
    """
    cfg, tensors = _read_lora(lora_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY_RE.match(key)
        if m is None:
            raise ValueError(f"{lora_dir}: unsupported tensor {key!r} (only lora_A/lora_B weights)")
        module = m["module"].removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m["kind"]] = t
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{lora_dir}: module {module!r} lacks lora_A or lora_B")
        if not _targets_module(cfg.get("target_modules"), module):
            raise ValueError(f"{lora_dir}: {module!r} is not in target_modules")
        a, b = ab["A"].to(torch.float64), ab["B"].to(torch.float64)
        r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{lora_dir}: {module!r} has A {list(a.shape)}, B {list(b.shape)}; r={r}"
            )
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[module] = scale * (b @ a)
    if not deltas:
        raise ValueError(f"{lora_dir}: no LoRA tensors")
    return deltas


def merge_lora_into_model(model: nn.Module, lora_dir: str | os.PathLike) -> None:
    """Merge a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into ``model``.

    Needs no peft: ``delta = scale * B @ A`` in float64, merged like a MoKA update, so LoRA and
    MoKA references are built the same way.
    """
    _merge_all(model, lora_deltas(lora_dir))


# --------------------------------------------------------------------------- loading, generating


def adapter_peft_type(adapter_dir: str | os.PathLike) -> str:
    """``peft_type`` from an adapter folder's adapter_config.json (e.g. "MOKA", "LORA")."""
    return adapter_kind(adapter_dir)


def load_reference_model(
    base_dir: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    quantize_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A transformers causal LM in eval mode, optionally NF4-quantized, with an adapter merged.

    ``quantize_4bit`` quantizes the base in flight with bitsandbytes NF4 (compute in ``dtype``),
    as ``vllm(quantization="bitsandbytes")`` does. The adapter kind is chosen by its peft_type.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = "cpu"
    model = keep_portable_4bit_layout(
        AutoModelForCausalLM.from_pretrained(os.fspath(base_dir), **kwargs)
    )
    if adapter_dir is not None:
        peft_type = adapter_peft_type(adapter_dir)
        if peft_type == "MOKA":
            merge_moka_into_model(model, load_adapter(adapter_dir))
        elif peft_type == "LORA":
            merge_lora_into_model(model, adapter_dir)
        else:
            raise ValueError(f"{adapter_dir}: unsupported peft_type {peft_type!r}")
    return model.eval()


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids vLLM stops at by default: the tokenizer's eos plus generation_config's eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return ids


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    ignore_eos: bool = False,
) -> list[int]:
    """New token ids of a greedy (argmax) continuation of ``prompt``, like vLLM's ``generate``.

    The prompt is tokenized as vLLM's ``LLM.generate(prompt)`` does: ``tokenizer.encode`` with
    the tokenizer's default special tokens (a BOS only if the tokenizer adds one; SmolLM2 and
    the tiny Llama add none) and no chat template. Generation stops after a stop token (which is
    included, as in vLLM's ``token_ids``) unless ``ignore_eos``. A plain loop with the KV cache,
    so no transformers generation defaults (repetition penalty, ...) can creep in.
    """
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    stop = set() if ignore_eos else _stop_ids(model, tokenizer)
    out: list[int] = []
    past = None
    for _ in range(max_new_tokens):
        result = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        if token in stop:
            break
        ids = torch.tensor([[token]], dtype=torch.long)
    return out
