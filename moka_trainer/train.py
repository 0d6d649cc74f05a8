"""The training loop behind ``moka-train``: MoKA (or a PEFT LoRA baseline) over a 4-bit base.

QLoRA-style recipe: the base is loaded in 4-bit NF4 through bitsandbytes (or plain with
``quantize=False``) and frozen; only the adapter trains, with AdamW (lr 2e-4), an effective
batch of 32 through gradient accumulation, and a linear warmup + linear decay schedule. The
loss is the token-mean cross-entropy over completion / assistant tokens of the whole effective
batch. Writes the adapter (MoKA format v1, or a standard PEFT LoRA folder), ``train_log.jsonl``
and ``train_info.json`` into the output folder, and optional checkpoints that ``resume`` picks
up exactly where they left off.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moka_serve.adapter_format import save_adapter
from moka_serve.base_models import DEFAULT_BASE_ID
from moka_serve.bnb_cpu import keep_portable_4bit_layout
from moka_serve.shapes import (
    FAMILIES,
    format_shapes,
    lora_params,
    module_params,
    parse_budget,
    parse_shapes,
    plan_shapes,
)

from . import data as data_mod
from .data import IGNORE_INDEX, DataError, Example
from .moka_layer import (
    INITS,
    export_adapter,
    inject_moka,
    moka_modules,
    target_dims,
    trainable_parameters,
)

LOG_NAME = "train_log.jsonl"
INFO_NAME = "train_info.json"
PREDICTIONS_NAME = "eval_predictions.jsonl"
CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.pt"


class TrainError(Exception):
    """A user-facing problem (bad option, path, model or data): printed without a traceback."""


@dataclass
class TrainConfig:
    """Every option of a run; the CLI maps its flags one to one onto these fields."""

    data: str
    out: str
    base: str | None = None  # None: the embedded SmolLM2-135M-Instruct (materialised once)
    eval_data: str | None = None
    method: str = "moka"  # "moka" or "lora"
    targets: Sequence[str] = ("q_proj", "v_proj")
    # MoKA
    components: int = 4
    budget: str | None = None  # "0.1%" of base params, or a count; None: cheapest diverse set
    shapes: Sequence[str] = ()
    variant: str = "moka"
    # mixed | lora | kron (moka_serve.shapes); None: mixed, or kron for variant mokas
    shape_family: str | None = None
    init: str = "lora"  # lora | a-random: which factor starts at zero (MokaLinear)
    gating: bool = True  # softmax gates; never for a single component (softmax of one is 1)
    # None: each component starts with coefficient 2, as a LoRA term with alpha = 2 * rank
    scaling: float | None = None
    # LoRA baseline
    rank: int = 8
    lora_alpha: float | None = None  # default 2 * rank
    # base model
    quantize: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 (compute dtype)
    device: str = "auto"
    gradient_checkpointing: bool = False
    # optimisation
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int = 8
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # data
    max_length: int = 512
    prompt_format: str = "plain"  # plain | chat (prompt/completion records only)
    # eval, logging, checkpoints
    eval_every: int = 0
    eval_before: bool = True  # also evaluate the untrained model (the base: delta_W = 0)
    max_eval_examples: int = 200
    eval_batch_size: int = 16
    log_every: int = 1
    save_every: int = 0
    resume: str | None = None  # a checkpoint folder, or "latest"
    progress: bool | None = None  # None: a bar when stderr is a terminal
    progress_every: int = 0  # without a bar: a status line every N steps (0: about 20 lines)
    threads: int = 0  # torch CPU threads (0: torch's default)
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def _say(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet:
        print(f"[moka-train] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checks


def check_config(cfg: TrainConfig) -> None:
    """Reject bad option values and paths before anything heavy is loaded."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainError(msg)

    need(cfg.method in ("moka", "lora"), f"--method must be moka or lora, got {cfg.method!r}")
    need(cfg.variant in ("moka", "mokas"), f"--variant must be moka or mokas, got {cfg.variant!r}")
    need(
        cfg.shape_family in (None, *FAMILIES),
        f"--shape-family must be one of {', '.join(FAMILIES)}",
    )
    need(cfg.init in INITS, f"--init must be one of {', '.join(INITS)}")
    need(
        cfg.variant == "moka" or cfg.shape_family in (None, "kron") or cfg.method != "moka",
        "--variant mokas needs --shape-family kron (rank-1 components need their A)",
    )
    need(bool(cfg.targets), "--targets must name at least one module, e.g. q_proj,v_proj")
    for t in cfg.targets:
        need(bool(t) and "." not in t and " " not in t, f"--targets: {t!r} is not a module name")
    need(len(set(cfg.targets)) == len(cfg.targets), "--targets lists a module twice")
    need(cfg.components >= 1, f"--components must be >= 1, got {cfg.components}")
    need(cfg.rank >= 1, f"--rank must be >= 1, got {cfg.rank}")
    need(
        cfg.scaling is None or (math.isfinite(cfg.scaling) and cfg.scaling != 0),
        "--scaling must be a nonzero number",
    )
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be positive, got {cfg.lr}")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {cfg.micro_batch_size}")
    need(
        cfg.batch_size % cfg.micro_batch_size == 0,
        f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
        f"{cfg.micro_batch_size} (gradient accumulation steps = batch / micro-batch)",
    )
    need(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables clipping)")
    need(cfg.max_length >= 8, f"--max-length must be >= 8, got {cfg.max_length}")
    need(cfg.prompt_format in ("plain", "chat"), "--prompt-format must be plain or chat")
    need(cfg.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16")
    need(cfg.threads >= 0, f"--threads must be >= 0, got {cfg.threads}")
    for name in ("eval_every", "log_every", "save_every", "progress_every"):
        need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
    need(cfg.max_eval_examples >= 1, "--max-eval-examples must be >= 1")
    need(cfg.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
    for opt, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None:
            need(Path(path).is_file(), f"{opt} {path}: no such file")
    out = Path(cfg.out)
    need(not out.exists() or out.is_dir(), f"--out {cfg.out}: exists and is not a folder")
    if cfg.method == "moka":
        try:
            parse_shapes(cfg.shapes)
            if cfg.budget is not None:
                parse_budget(cfg.budget, 1)
        except ValueError as e:
            raise TrainError(str(e)) from None
    elif cfg.shapes or cfg.budget is not None:
        raise TrainError("--shapes and --budget apply to --method moka only (LoRA uses --rank)")
    if cfg.base is not None and _looks_like_path(cfg.base):
        need(Path(cfg.base).expanduser().is_dir(), f"--base {cfg.base}: no such model folder")
        need(
            (Path(cfg.base).expanduser() / "config.json").is_file(),
            f"--base {cfg.base}: not a model folder (no config.json)",
        )
    if cfg.resume not in (None, "latest"):
        need(
            (Path(cfg.resume) / STATE_NAME).is_file(),
            f"--resume {cfg.resume}: not a checkpoint folder (no {STATE_NAME})",
        )


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name" or "name")."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
    )


# --------------------------------------------------------------------------- model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
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
        return str(Path(base).expanduser()) if _looks_like_path(base) else base
    from moka_serve.base_models import materialize_default_base

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
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
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


def count_base_params(model: nn.Module) -> int:
    """Parameters of the base model, counting 4-bit weights by their logical shape."""
    n = 0
    for name, p in model.named_parameters():
        if ".moka_" in name or "lora_" in name:
            continue
        qs = getattr(p, "quant_state", None)
        n += math.prod(qs.shape) if qs is not None else p.numel()
    return n


# --------------------------------------------------------------------------- adapters


def serving_notes(shapes: dict) -> list[str]:
    """What ``moka-serve`` needs beyond its default bank limits to serve these shapes."""
    from moka_serve.limits import DEFAULT_MAX_COMPONENTS, DEFAULT_MAX_FACTOR_NUMEL

    notes = []
    r = max(len(v) for v in shapes.values())
    if r > DEFAULT_MAX_COMPONENTS:
        notes.append(
            f"{r} components per module: serve with MOKA_MAX_COMPONENTS={r} (moka-serve's "
            f"default is {DEFAULT_MAX_COMPONENTS})"
        )
    numel = max(max(c.m1 * c.n1, c.m2 * c.n2) for v in shapes.values() for c in v)
    if numel > DEFAULT_MAX_FACTOR_NUMEL:
        notes.append(
            f"a factor of {numel} elements: serve with MOKA_MAX_FACTOR_NUMEL={numel} "
            f"(moka-serve's default is {DEFAULT_MAX_FACTOR_NUMEL})"
        )
    return notes


def shape_family(cfg: TrainConfig) -> str:
    """The family of automatic shapes: as given, else mixed (kron for MoKAs, which has no A)."""
    return cfg.shape_family or ("kron" if cfg.variant == "mokas" else "mixed")


def setup_moka(model: nn.Module, cfg: TrainConfig, base_params: int) -> dict:
    """Inject MoKA modules; return a summary (shapes, parameter counts, LoRA comparison)."""
    try:
        dims, counts = target_dims(model, list(cfg.targets))
        explicit = parse_shapes(cfg.shapes)
        budget = None if cfg.budget is None else parse_budget(cfg.budget, base_params)
        shapes, notes = plan_shapes(
            dims,
            counts,
            num_components=cfg.components,
            budget=budget,
            explicit=explicit,
            variant=cfg.variant,
            gating=cfg.gating,
            family=shape_family(cfg),
        )
    except ValueError as e:
        raise TrainError(str(e)) from None
    # No gate for a single component: softmax over one logit is 1, the gate would not train.
    r = max(len(v) for v in shapes.values())
    notes += serving_notes(shapes)
    gating = cfg.gating and r > 1
    # Default scaling: alpha_i = softmax(0) = 1/r at init, so scaling 2r (2 ungated) starts each
    # component at coefficient 2, the alpha / rank = 2 of a LoRA with alpha = 2 * rank: rank-1
    # components then train exactly like that LoRA's terms. Scaling 1 would make the update 2r
    # times smaller, which under Adam means that much slower learning in function space.
    scaling = cfg.scaling if cfg.scaling is not None else float(2 * r if gating else 2)
    inject_moka(model, shapes, gating=gating, variant=cfg.variant, scaling=scaling, init=cfg.init)
    trainable = trainable_parameters(model)
    expected = sum(module_params(shapes[t], cfg.variant, gating) * counts[t] for t in dims)
    assert trainable == expected, (trainable, expected)
    return {
        "method": "moka",
        "targets": {
            t: {"out_x_in": list(dims[t]), "modules": counts[t], "shapes": format_shapes(shapes[t])}
            for t in dims
        },
        "notes": notes,
        "budget_params": budget,
        "scaling": scaling,
        "gating": gating,
        "shape_family": shape_family(cfg),
        "init": cfg.init,
        "variant": cfg.variant,
        "trainable_params": trainable,
        "base_params": base_params,
        "lora_params_same_targets": {
            f"rank{r}": lora_params(dims, counts, r) for r in sorted({4, 8, 16, cfg.rank})
        },
    }


def setup_lora(model: nn.Module, cfg: TrainConfig, base_params: int) -> tuple[nn.Module, dict]:
    from peft import LoraConfig, get_peft_model

    try:
        dims, counts = target_dims(model, list(cfg.targets))
    except ValueError as e:
        raise TrainError(str(e)) from None
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.rank,
        target_modules=list(cfg.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    trainable = trainable_parameters(model)
    return model, {
        "method": "lora",
        "rank": cfg.rank,
        "lora_alpha": lcfg.lora_alpha,
        "targets": {t: {"out_x_in": list(dims[t]), "modules": counts[t]} for t in dims},
        "trainable_params": trainable,
        "base_params": base_params,
    }


def describe(info: dict) -> list[str]:
    """Human-readable lines about what trains, printed before training starts."""
    lines = []
    base = info["base_params"]
    pct = 100 * info["trainable_params"] / base
    if info["method"] == "moka":
        for t, d in info["targets"].items():
            o, i = d["out_x_in"]
            lines.append(f"{t} ({o}x{i}, {d['modules']} modules): components {d['shapes']}")
        lines += info["notes"]
        one = all(len(d["shapes"].split(",")) == 1 for d in info["targets"].values())
        gating = "softmax" if info["gating"] else "none (one component)" if one else "off"
        lines.append(
            f"shape family {info['shape_family']}, init {info['init']}, gating {gating}, "
            f"scaling {info['scaling']:g}"
        )
    else:
        lines.append(
            f"LoRA rank {info['rank']}, alpha {info['lora_alpha']} on {list(info['targets'])}"
        )
    lines.append(
        f"trainable parameters: {info['trainable_params']:,} ({pct:.4f}% of {base:,} base)"
    )
    for name, n in info.get("lora_params_same_targets", {}).items():
        lines.append(f"  a {name.replace('rank', 'rank-')} LoRA on the same targets: {n:,}")
    return lines


def save_trained(model: nn.Module, cfg: TrainConfig, out: Path, base_name: str) -> None:
    if cfg.method == "moka":
        save_adapter(export_adapter(model, base_name), out)
    else:
        model.save_pretrained(str(out))


# --------------------------------------------------------------------------- loss, eval


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss_sum(model: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count.

    Logits are computed only from the first position that predicts a labelled token on (the
    ``logits_to_keep`` of transformers' causal LMs): for prompt/completion data that skips the
    output projection, the largest matmul of a small model, over most prompt positions.
    """
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["labels"][:, 1:]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    seq = batch["input_ids"].shape[1]
    first = int(labelled[0]) if len(labelled) else seq - 2
    keep = seq - first  # logits for positions first .. seq-1 (the last predicts nothing)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    logits = logits[:, :-1].float()
    labels = labels[:, first:]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def _micro_batches(batch: Sequence[Example], size: int) -> list[list[Example]]:
    ordered = sorted(batch, key=lambda e: len(e.input_ids))  # less padding per micro-batch
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


@torch.no_grad()
def greedy_completions(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded as text."""
    pad = tokenizer.pad_token_id
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos.discard(None)
    out_texts = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, n - len(p) :] = torch.tensor(p)
            mask[i, n - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=sorted(eos),
        )
        for row in gen[:, n:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos), len(row))
            out_texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out_texts


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Eval loss (token mean) and, for prompt/completion records, greedy exact-match accuracy."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id
    try:
        with torch.no_grad(), _autocast(device, dtype):
            for i in range(0, len(examples), cfg.eval_batch_size):
                chunk = examples[i : i + cfg.eval_batch_size]
                loss, n = batch_loss_sum(model, data_mod.collate(chunk, pad), device)
                total += float(loss)
                count += n
            result = {"eval_loss": total / max(count, 1), "eval_examples": len(examples)}
            pc = [e for e in examples if e.prompt_ids is not None]
            if pc:
                longest = max(len(e.input_ids) - len(e.prompt_ids) for e in pc)
                texts = greedy_completions(
                    model,
                    tokenizer,
                    [e.prompt_ids for e in pc],
                    longest + 4,
                    cfg.eval_batch_size,
                    device,
                )
                preds = [
                    {
                        "line": e.line,
                        "prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False),
                        "expected": e.completion,
                        "generated": t,
                        "correct": t.strip() == e.completion.strip(),
                    }
                    for t, e in zip(texts, pc, strict=True)
                ]
                result["eval_exact_match"] = sum(p["correct"] for p in preds) / len(pc)
                result["eval_predictions"] = preds
    finally:
        model.train(was_training)
    return result


# --------------------------------------------------------------------------- schedule, state


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps (the first update already gets lr/warmup), then
    linear decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    step: int,
    cfg: TrainConfig,
    base_name: str,
) -> None:
    """``checkpoints/step-N``: trainer state (factors, optimizer, schedule, RNG) + the adapter."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "step": step,
            "method": cfg.method,
            "trainable": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / STATE_NAME,
    )
    save_trained(model, cfg, tmp / "adapter", base_name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def latest_checkpoint(out: Path) -> Path | None:
    folders = []
    for p in (out / CHECKPOINTS).glob("step-*"):
        if (p / STATE_NAME).is_file() and p.name[5:].isdigit():
            folders.append((int(p.name[5:]), p))
    return max(folders)[1] if folders else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, cfg: TrainConfig) -> int:
    try:
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"--resume {folder}: cannot read {STATE_NAME}: {e}") from None
    if state.get("method") != cfg.method:
        raise TrainError(f"--resume {folder}: checkpoint is --method {state.get('method')}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
        raise TrainError(
            f"--resume {folder}: the checkpoint's adapter does not match this run's "
            "(different targets, shapes, components or rank)"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


# --------------------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> dict:
    """Run training end to end; returns the summary also written to ``train_info.json``."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = lambda msg: _say(cfg, msg)  # noqa: E731
    start_time = time.monotonic()
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    base_name = resolve_base(cfg.base, say)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    say(f"loading {base_name} ({'4-bit NF4' if cfg.quantize else str(dtype)}, {device})")
    model, tokenizer = load_base_model(base_name, quantize=cfg.quantize, device=device, dtype=dtype)
    try:
        train_ex = data_mod.load_examples(
            cfg.data, tokenizer, max_length=cfg.max_length, prompt_format=cfg.prompt_format
        )
        eval_ex = (
            data_mod.load_examples(
                cfg.eval_data,
                tokenizer,
                max_length=cfg.max_length,
                prompt_format=cfg.prompt_format,
            )[: cfg.max_eval_examples]
            if cfg.eval_data
            else []
        )
    except DataError as e:
        raise TrainError(str(e)) from None

    base_params = count_base_params(model)
    torch.manual_seed(cfg.seed)  # adapter init depends only on the seed
    if cfg.method == "moka":
        info = setup_moka(model, cfg, base_params)
    else:
        model, info = setup_lora(model, cfg, base_params)
    for line in describe(info):
        say(line)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with contextlib.suppress(AttributeError):
        model.config.use_cache = False

    per_epoch = data_mod.steps_per_epoch(len(train_ex), cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    accum = cfg.batch_size // cfg.micro_batch_size
    say(
        f"{len(train_ex)} training examples, {total} steps of {cfg.batch_size} "
        f"({accum} x {cfg.micro_batch_size}), lr {cfg.lr:g}, warmup {warmup}"
    )

    out.mkdir(parents=True, exist_ok=True)
    start_step = 0
    resume = cfg.resume
    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            say(f"--resume latest: no checkpoint in {out / CHECKPOINTS}, starting from scratch")
        resume = found
    if resume is not None:
        start_step = load_checkpoint(Path(resume), model, optimizer, scheduler, cfg)
        say(f"resumed from {resume} at step {start_step}")
    log_path = out / LOG_NAME
    kept = _log_lines_up_to(log_path, start_step) if start_step else []
    log_f = open(log_path, "w", encoding="utf-8")
    log_f.writelines(kept)

    def log(entry: dict) -> None:
        log_f.write(json.dumps(entry) + "\n")
        log_f.flush()

    def logged_eval(step: int) -> tuple[dict, list[dict]]:
        """Evaluate, log the metrics at ``step``; the metrics and every generation apart."""
        ev = evaluate(model, tokenizer, eval_ex, cfg, device, dtype)
        preds = ev.pop("eval_predictions", [])
        log({"step": step, **ev})
        return ev, preds

    results: dict = {}
    if eval_ex and start_step == 0 and cfg.eval_before:
        results["before"], _ = logged_eval(0)
        say(f"eval before training: {_fmt_eval(results['before'])}")

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=start_step,
        desc="moka-train",
        unit="step",
        disable=(not sys.stderr.isatty()) if cfg.progress is None else not cfg.progress,
    )
    # Without a bar (a log file, CI, nohup): a plain status line every N steps instead.
    every = 0 if not bar.disable or cfg.quiet else cfg.progress_every or max(1, total // 20)
    model.train()
    pad = tokenizer.pad_token_id
    losses: list[float] = []
    train_tokens = 0
    train_time = 0.0
    try:
        for step, _epoch, batch in data_mod.batches(train_ex, cfg.batch_size, cfg.seed, start_step):
            if step >= total:
                break
            t0 = time.monotonic()
            n_labels = sum(e.num_label_tokens - (e.labels[0] != IGNORE_INDEX) for e in batch)
            tokens = sum(len(e.input_ids) for e in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for mb in _micro_batches(batch, cfg.micro_batch_size):
                with _autocast(device, dtype):
                    loss, _ = batch_loss_sum(model, data_mod.collate(mb, pad), device)
                (loss / max(n_labels, 1)).backward()
                step_loss += float(loss.detach())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            dt = time.monotonic() - t0
            train_time += dt
            train_tokens += tokens
            mean_loss = step_loss / max(n_labels, 1)
            losses.append(mean_loss)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if cfg.log_every and (done % cfg.log_every == 0 or done == total):
                log(
                    {
                        "step": done,
                        "epoch": round(done / per_epoch, 4),
                        "loss": mean_loss,
                        "lr": lr,
                        "tokens_per_s": tokens / dt if dt > 0 else None,
                        "elapsed_s": round(time.monotonic() - start_time, 3),
                    }
                )
            if every and (done % every == 0 or done == total):
                rate = train_tokens / train_time if train_time else 0.0
                eta = train_time / (done - start_step) * (total - done)
                say(
                    f"step {done}/{total} (epoch {done / per_epoch:.2f}) loss {mean_loss:.4f} "
                    f"{rate:.0f} tokens/s, eta {_fmt_duration(eta)}"
                )
            if eval_ex and cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                ev, _ = logged_eval(done)
                say(f"step {done}: {_fmt_eval(ev)}")
            if cfg.save_every and done % cfg.save_every == 0 and done != total:
                save_checkpoint(
                    out / CHECKPOINTS / f"step-{done}",
                    model,
                    optimizer,
                    scheduler,
                    done,
                    cfg,
                    base_name,
                )
    finally:
        bar.close()

    if eval_ex:
        results["after"], preds = logged_eval(total)
        _write_predictions(out / PREDICTIONS_NAME, preds)
        say(f"eval after training: {_fmt_eval(results['after'])}")
    log_f.close()
    save_trained(model, cfg, out, base_name if cfg.base is not None else DEFAULT_BASE_ID)
    summary = {
        **info,
        "base_model": base_name,
        "quantized_4bit": cfg.quantize,
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "steps": total,
        "resumed_from_step": start_step,
        "train_examples": len(train_ex),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_time_s": round(train_time, 3),
        "train_tokens_per_s": train_tokens / train_time if train_time else None,
        "wall_time_s": round(time.monotonic() - start_time, 3),
        **results,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    (out / INFO_NAME).write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    say(
        f"wrote {'MoKA adapter' if cfg.method == 'moka' else 'PEFT LoRA adapter'} to {out} "
        f"(loss {summary['first_loss']} -> {summary['last_loss']}, "
        f"{summary['wall_time_s']:.1f} s)"
    )
    summary["model"] = model
    summary["tokenizer"] = tokenizer
    return summary


def _write_predictions(path: Path, preds: list[dict]) -> None:
    """Every held-out generation of the final eval, so a user can see what failed."""
    with open(path, "w", encoding="utf-8") as f:
        for p in preds:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def _log_lines_up_to(path: Path, step: int) -> list[str]:
    """The log lines of an interrupted run up to the checkpoint it resumes from."""
    kept = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
    return kept


def _fmt_eval(ev: dict) -> str:
    s = f"loss {ev['eval_loss']:.4f}"
    if "eval_exact_match" in ev:
        s += f", exact match {100 * ev['eval_exact_match']:.1f}%"
    return s


__all__ = [
    "TrainConfig",
    "TrainError",
    "count_base_params",
    "evaluate",
    "greedy_completions",
    "latest_checkpoint",
    "load_base_model",
    "moka_modules",
    "train",
]
