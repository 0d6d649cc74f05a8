"""The recipe behind ``moka-train``: MoKA (or a PEFT LoRA baseline) over a 4-bit base, trained by
transformers' ``Trainer``.

QLoRA-style: the base is loaded in 4-bit NF4 through bitsandbytes (or plain with
``quantize=False``) and frozen; the adapter is a PEFT model in both cases (``moka_peft``'s
``MokaPeftConfig`` or PEFT's ``LoraConfig``), so MoKA and LoRA share this one code path. AdamW
(lr 2e-4), an effective batch of 32 through gradient accumulation, linear warmup then linear
decay; the loss is the token mean over completion / assistant tokens of the whole effective
batch (the Trainer's ``num_items_in_batch``), across processes too. Multi-process training,
mixed precision, checkpoints and resume, and the loggers are the Trainer's.

Why the ``Trainer`` and not TRL's ``SFTTrainer`` (a subclass of it): our data path already
renders chat and prompt/completion records with labels on the completion only, and
``SFTTrainer`` would re-do that with its own dataset handling, and cast the adapter's weights to
bf16 on a quantized base, where MoKA's factors and gates train in float32. ``SFTTrainer(
peft_config=MokaPeftConfig(...))`` works too (docs/training.md; tested over a 4-bit base).

Writes the adapter (format v1, or a PEFT LoRA folder), ``train_log.jsonl``, ``train_info.json``,
``eval_predictions.jsonl`` with ``--eval-data``, and ``checkpoints/checkpoint-N`` with
``--save-every`` (the Trainer's checkpoints; ``resume`` continues from one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moka_core.base_models import DEFAULT_BASE_ID
from moka_core.shapes import (
    FAMILIES,
    format_shapes,
    lora_params,
    module_params,
    parse_budget,
    parse_shapes,
)

from .base_model import (
    TrainError,
    compute_dtype,
    load_base_model,
    looks_like_path,
    pick_device,
    resolve_base,
)
from .data import LONG_RECORDS, CompletionCollator, DataError, load_examples

# Which factor starts at zero (moka_peft.layer.MokaLayer.reset_moka_parameters).
INITS = ("lora", "a-random")
# moka, or PEFT's LoraConfig (dora: use_dora=True, "QDoRA" over a 4-bit base) through one path
METHODS = ("moka", "lora", "dora")

LOG_NAME = "train_log.jsonl"
INFO_NAME = "train_info.json"
PREDICTIONS_NAME = "eval_predictions.jsonl"
CHECKPOINTS = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class TrainConfig:
    """Every option of a run; the CLI maps its flags one to one onto these fields."""

    data: str
    out: str
    base: str | None = None  # None: the embedded SmolLM2-135M-Instruct (materialised once)
    eval_data: str | None = None
    method: str = "moka"  # "moka", "lora" or "dora" (PEFT LoRA with use_dora: QDoRA on 4-bit)
    targets: Sequence[str] = ("q_proj", "v_proj")
    # MoKA
    components: int = 4
    budget: str | None = None  # "0.1%" of base params, or a count; None: cheapest diverse set
    shapes: Sequence[str] = ()
    variant: str = "moka"
    # mixed | lora | kron (moka_core.shapes); None: mixed, or kron for variant mokas
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
    long_records: str = "truncate"  # truncate | skip (moka_trainer.data.fit_length)
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
    report_to: str = "none"  # the Trainer's loggers: none, tensorboard, wandb, ... (comma list)
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def check_config(cfg: TrainConfig) -> None:
    """Reject bad option values and paths before anything heavy is loaded."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainError(msg)

    need(
        cfg.method in METHODS,
        f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}",
    )
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
    need(cfg.long_records in LONG_RECORDS, f"--long-records must be one of {LONG_RECORDS}")
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
                parse_budget(cfg.budget, 1, 1)
        except ValueError as e:
            raise TrainError(str(e)) from None
    elif cfg.shapes or cfg.budget is not None:
        raise TrainError(
            "--shapes and --budget apply to --method moka only (LoRA and DoRA use --rank)"
        )
    if cfg.base is not None and looks_like_path(cfg.base):
        need(Path(cfg.base).expanduser().is_dir(), f"--base {cfg.base}: no such model folder")
        need(
            (Path(cfg.base).expanduser() / "config.json").is_file(),
            f"--base {cfg.base}: not a model folder (no config.json)",
        )
    if cfg.resume not in (None, "latest"):
        need(
            (Path(cfg.resume) / TRAINER_STATE_NAME).is_file(),
            f"--resume {cfg.resume}: not a checkpoint folder (no {TRAINER_STATE_NAME})",
        )


def _say(cfg: TrainConfig, msg: str) -> None:
    if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"[moka-train] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- adapters


def peft_config(cfg: TrainConfig, model: nn.Module, targets: list[str]):
    """The PEFT config of the run, planned on ``model``, and notes for the user."""
    if cfg.method in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(
            r=cfg.rank,
            use_dora=cfg.method == "dora",
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.rank,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ), []
    from moka_peft import MokaPeftConfig
    from moka_peft.planning import plan

    pc = MokaPeftConfig(
        target_modules=targets,
        components=cfg.components,
        budget=cfg.budget,
        shape_family=cfg.shape_family,
        shapes=list(cfg.shapes),
        variant=cfg.variant,
        gating=cfg.gating,
        scaling=cfg.scaling,
        init=cfg.init,
        task_type="CAUSAL_LM",
    )
    return pc, plan(pc, model)


def attach_adapter(model: nn.Module, cfg: TrainConfig, base_params: int) -> tuple[nn.Module, dict]:
    """``get_peft_model`` with the run's config; a summary (shapes, parameter counts)."""
    from peft import get_peft_model

    from moka_peft.planning import ALL_LINEAR, all_linear_targets, target_dims

    targets = all_linear_targets(model) if list(cfg.targets) == [ALL_LINEAR] else list(cfg.targets)
    try:
        dims, counts = target_dims(model, targets)
        pc, notes = peft_config(cfg, model, targets)
    except ValueError as e:
        raise TrainError(str(e)) from None
    model = get_peft_model(model, pc)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info: dict = {
        "method": cfg.method,
        "targets": {t: {"out_x_in": list(dims[t]), "modules": counts[t]} for t in dims},
        "trainable_params": trainable,
        "base_params": base_params,
    }
    if cfg.method in ("lora", "dora"):
        return model, {**info, "rank": cfg.rank, "lora_alpha": pc.lora_alpha}
    shapes = {t: pc.component_shapes(t) for t in dims}
    expected = sum(module_params(shapes[t], pc.variant, pc.gating) * counts[t] for t in dims)
    assert trainable == expected, (trainable, expected)
    for t in dims:
        info["targets"][t]["shapes"] = format_shapes(shapes[t])
    return model, {
        **info,
        "notes": notes,
        "budget_params": pc.budget_params,
        "scaling": pc.scaling,
        "gating": pc.gating,
        "shape_family": pc.family(),
        "init": pc.init,
        "variant": pc.variant,
        "lora_params_same_targets": {
            f"rank{r}": lora_params(dims, counts, r) for r in sorted({4, 8, 16, cfg.rank})
        },
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


# --------------------------------------------------------------------------- the Trainer


def training_arguments(cfg: TrainConfig, out: Path, device: torch.device, dtype: torch.dtype):
    """The run's options as ``TrainingArguments``: ``--batch-size`` is the global batch (all
    processes and accumulation steps together)."""
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = cfg.micro_batch_size * world
    if cfg.batch_size % per_step:
        raise TrainError(
            f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
            f"{cfg.micro_batch_size} x {world} processes"
        )
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // per_step,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # below 1: a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        logging_steps=cfg.log_every or 1,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        report_to=[r for r in cfg.report_to.split(",") if r and r != "none"] or "none",
        disable_tqdm=not show_bar(cfg),
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and dtype == torch.bfloat16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def show_bar(cfg: TrainConfig) -> bool:
    return sys.stderr.isatty() if cfg.progress is None else cfg.progress


class RunLog:
    """``train_log.jsonl`` and the status lines, fed by :class:`LogCallback` and the evals."""

    def __init__(self, cfg: TrainConfig, path: Path, resumed_at: int, start: float) -> None:
        self.cfg, self.start = cfg, start
        kept = _log_lines_up_to(path, resumed_at) if resumed_at else []
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.file.writelines(kept)
        self.losses: list[float] = []
        self.evals: dict[str, dict] = {}
        self.train_time = 0.0  # seconds inside optimizer steps (evaluation left out)
        self.tokens = 0  # non-padding input tokens of this process's run, all processes

    def write(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def eval_result(self, step: int, metrics: dict, when: str) -> None:
        self.write({"step": step, **metrics})
        self.evals[when] = metrics
        _say(self.cfg, f"eval {when + ' training' if when in ('before', 'after') else when}: "
                       f"{_fmt_eval(metrics)}")  # fmt: skip

    def close(self) -> None:
        self.file.close()


def log_callback(run_log: RunLog, cfg: TrainConfig):
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        """Each Trainer log as a ``train_log.jsonl`` line (step, epoch, loss, lr, tokens/s), and
        without a progress bar a status line every ``--progress-every`` steps."""

        def __init__(self) -> None:
            self.step_time = self.train_time = 0.0
            self.tokens_at_log = 0
            self.time_at_log = 0.0
            self.first_step: int | None = None
            self.tokens_at_begin = 0
            self.every = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_at_log = self.tokens_at_begin = state.num_input_tokens_seen
            self.first_step = state.global_step
            if not show_bar(cfg) and not cfg.quiet:
                self.every = cfg.progress_every or max(1, state.max_steps // 20)

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_time = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.train_time += time.monotonic() - self.step_time
            run_log.train_time = self.train_time
            run_log.tokens = state.num_input_tokens_seen - self.tokens_at_begin

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            step = state.global_step
            dt = self.train_time - self.time_at_log
            dtok = state.num_input_tokens_seen - self.tokens_at_log
            self.time_at_log, self.tokens_at_log = self.train_time, state.num_input_tokens_seen
            run_log.losses.append(logs["loss"])
            run_log.write(
                {
                    "step": step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "loss": logs["loss"],
                    "lr": logs.get("learning_rate"),
                    "tokens_per_s": dtok / dt if dt > 0 else None,
                    "elapsed_s": round(time.monotonic() - run_log.start, 3),
                }
            )
            if self.every and (step % self.every == 0 or step == state.max_steps):
                rate = run_log.tokens / self.train_time if self.train_time else 0.0
                done = step - (self.first_step or 0)
                eta = self.train_time / max(done, 1) * (state.max_steps - step)
                _say(
                    cfg,
                    f"step {step}/{state.max_steps} (epoch {state.epoch or 0:.2f}) loss "
                    f"{logs['loss']:.4f} {rate:.0f} tokens/s, eta {_fmt_duration(eta)}",
                )

    return LogCallback()


def resume_point(cfg: TrainConfig, out: Path) -> tuple[str | None, int]:
    """The checkpoint to resume from (``--resume``: a folder, or ``latest``) and its step."""
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.resume is None:
        return None, 0
    folder: str | None = cfg.resume
    if cfg.resume == "latest":
        ckpts = out / CHECKPOINTS
        folder = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
        if folder is None:
            _say(cfg, f"--resume latest: no checkpoint in {ckpts}, starting from scratch")
            return None, 0
    try:
        state = json.loads((Path(folder) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        return folder, int(state["global_step"])
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"--resume {folder}: cannot read {TRAINER_STATE_NAME}: {e}") from None


# --------------------------------------------------------------------------- the run


@dataclass
class Trained:
    """A finished run: the summary written to ``train_info.json``, and the trained PEFT model
    with its tokenizer (for a caller that goes on using them, e.g. tests)."""

    summary: dict
    model: nn.Module | None
    tokenizer: object


def train(cfg: TrainConfig) -> dict:
    """Run training end to end; returns the summary also written to ``train_info.json``."""
    return train_model(cfg).summary


def train_model(cfg: TrainConfig) -> Trained:
    """:func:`train`, keeping the model."""
    from transformers import PrinterCallback, Trainer, set_seed

    from .evaluation import GenerationEval, evaluate

    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = lambda msg: _say(cfg, msg)  # noqa: E731
    start_time = time.monotonic()
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    base_name = resolve_base(cfg.base, say)

    set_seed(cfg.seed)
    say(f"loading {base_name} ({'4-bit NF4' if cfg.quantize else str(dtype)}, {device})")
    model, tokenizer = load_base_model(base_name, quantize=cfg.quantize, device=device, dtype=dtype)
    data_opts = dict(
        max_length=cfg.max_length, prompt_format=cfg.prompt_format, long_records=cfg.long_records
    )
    try:
        train_ex, report = load_examples(cfg.data, tokenizer, **data_opts)
        eval_ex, eval_report = (
            load_examples(cfg.eval_data, tokenizer, **data_opts) if cfg.eval_data else ([], None)
        )
    except DataError as e:
        raise TrainError(str(e)) from None
    eval_ex = eval_ex[: cfg.max_eval_examples]
    for path, rep in ((cfg.data, report), (cfg.eval_data, eval_report)):
        if rep is not None and (line := rep.line(path, cfg.max_length)):
            say(line)

    from moka_peft.planning import count_base_params

    base_params = count_base_params(model)
    set_seed(cfg.seed)  # adapter init depends only on the seed
    model, info = attach_adapter(model, cfg, base_params)
    for line in describe(info):
        say(line)
    with contextlib.suppress(AttributeError):
        model.config.use_cache = False

    out.mkdir(parents=True, exist_ok=True)
    args = training_arguments(cfg, out, device, dtype)
    resume, start_step = resume_point(cfg, out)
    run_log = RunLog(cfg, out / LOG_NAME, start_step, start_time)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ex,
        data_collator=CompletionCollator(tokenizer.pad_token_id),
    )
    trainer.remove_callback(PrinterCallback)  # our status lines instead of printed dicts
    trainer.add_callback(log_callback(run_log, cfg))
    if eval_ex:
        trainer.add_callback(
            GenerationEval(
                tokenizer,
                eval_ex,
                batch_size=cfg.eval_batch_size,
                dtype=dtype,
                before=cfg.eval_before,
                every=cfg.eval_every,
                record=run_log.eval_result,
            )
        )
    say(
        f"{len(train_ex)} training examples, batch {cfg.batch_size} "
        f"({args.gradient_accumulation_steps} x {cfg.micro_batch_size} x "
        f"{args.world_size} processes), lr {cfg.lr:g}"
        + (f", resuming from {resume} at step {start_step}" if resume else "")
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
        steps = trainer.state.global_step
        if not trainer.is_world_process_zero():
            return Trained({}, None, tokenizer)
        results = {k: v for k, v in run_log.evals.items() if k == "before"}
        if eval_ex:
            ev = evaluate(trainer.model, tokenizer, eval_ex, cfg.eval_batch_size, dtype)
            _write_predictions(out / PREDICTIONS_NAME, ev.pop("eval_predictions", []))
            run_log.eval_result(steps, ev, "after")
            results["after"] = ev
    finally:
        run_log.close()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.peft_config["default"].base_model_name_or_path = (
        base_name if cfg.base is not None else DEFAULT_BASE_ID
    )
    peft_model.save_pretrained(str(out))
    train_time, tokens = run_log.train_time, run_log.tokens
    summary = {
        **info,
        "base_model": base_name,
        "quantized_4bit": cfg.quantize,
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "processes": args.world_size,
        "steps": steps,
        "resumed_from_step": start_step,
        "train_examples": len(train_ex),
        "records_truncated": report.truncated,
        "records_skipped": report.skipped,
        "first_loss": run_log.losses[0] if run_log.losses else None,
        "last_loss": run_log.losses[-1] if run_log.losses else None,
        "train_time_s": round(train_time, 3),
        "train_tokens_per_s": tokens / train_time if train_time else None,
        "wall_time_s": round(time.monotonic() - start_time, 3),
        **results,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    (out / INFO_NAME).write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    say(
        f"wrote {'MoKA' if cfg.method == 'moka' else f'PEFT {cfg.method}'} adapter to {out} "
        f"(loss {summary['first_loss']} -> {summary['last_loss']}, "
        f"{summary['wall_time_s']:.1f} s)"
    )
    return Trained(summary, peft_model, tokenizer)


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
    from .evaluation import format_eval

    return format_eval(ev)


__all__ = [
    "TrainConfig",
    "TrainError",
    "Trained",
    "attach_adapter",
    "check_config",
    "train",
    "train_model",
]
