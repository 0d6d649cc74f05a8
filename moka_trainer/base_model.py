"""The frozen base for ``moka-train``: device, compute dtype, and the model (4-bit NF4 through
bitsandbytes by default) with its tokenizer. Problems are ``TrainError`` lines, not tracebacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moka_core.bnb_cpu import keep_portable_4bit_layout


class TrainError(Exception):
    """A user-facing problem (bad option, path, model or data): printed without a traceback."""


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name" or "name")."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index:
        raise TrainError(
            f"--device {name}: the Trainer uses one device per process; pick the GPU with "
            f"CUDA_VISIBLE_DEVICES={dev.index} and --device cuda"
        )
    return dev


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the device supports it (CUDA with bf16), else float32 (CPU)."""
    if name == "float32":
        return torch.float32
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bfloat16":
        if device.type == "cpu":
            return torch.bfloat16
        if not bf16_ok:
            raise TrainError(f"--dtype bfloat16: {device} does not support bfloat16")
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else torch.float32


def resolve_base(base: str | None, say: Callable[[str], None]) -> str:
    if base is not None:
        return str(Path(base).expanduser()) if looks_like_path(base) else base
    from moka_core.base_models import materialize_default_base

    say("no --base given: using the embedded SmolLM2-135M-Instruct")
    try:
        return str(materialize_default_base())
    except FileNotFoundError as e:
        raise TrainError(f"the default base model is not available: {e}; pass --base") from None


def load_base_model(
    base: str, *, quantize: bool, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, object]:
    """The frozen base (4-bit NF4 via bitsandbytes when ``quantize``) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"dtype": dtype}
    # One process per device under torchrun / accelerate launch: each loads its own copy.
    local = int(os.environ.get("LOCAL_RANK", device.index or 0))
    device_map = {"": local} if device.type == "cuda" else "cpu"
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise TrainError(
                f"4-bit base needs bitsandbytes ({e}); or pass --no-quantize"
            ) from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"cannot load base model {base!r}: {first}") from None
    if quantize:
        keep_portable_4bit_layout(model)
    else:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
