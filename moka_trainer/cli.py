"""``moka-train``: train MoKA adapters over a 4-bit base, QLoRA-style (issue #3).

Bad options, paths, models and data are reported as one ``moka-train: error: ...`` line with
exit code 2 (never a traceback; ``--debug`` shows one for bug reports).
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
data formats (JSONL, one object per line; kinds may be mixed):
  {"prompt": "...", "completion": "..."}   loss on the completion only
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
                                           chat template; loss on assistant turns only
  {"text": "..."}                          loss on every token

output (--out DIR):
  adapter_config.json, adapter_model.safetensors   MoKA adapter format v1 (or a PEFT LoRA folder
                                                   with --method lora)
  train_log.jsonl    one JSON line per step: step, loss, lr, tokens_per_s (+ eval entries)
  train_info.json    parameter counts, shapes, timings, eval before/after
  eval_predictions.jsonl  with --eval-data: every held-out generation of the final eval
                     (line, prompt, expected, generated, correct)
  checkpoints/checkpoint-N  with --save-every N: the Trainer's checkpoints (resume with
                     --resume latest)

examples:
  moka-train --base ./SmolLM2-135M-Instruct --data train.jsonl --out runs/moka
  moka-train --data train.jsonl --eval-data eval.jsonl --out runs/moka \\
      --components 4 --budget 0.2%
  moka-train --data train.jsonl --out runs/moka --shapes q_proj=24x24x24x24,12x48x48x12 \\
      --shapes v_proj=12x24x16x24,16x16x12x36
  moka-train --data train.jsonl --out runs/lora --method lora --rank 8
  moka-train --data train.jsonl --out runs/moka --budget lora-8 --targets all-linear

several processes (data parallel; --batch-size stays the global batch):
  torchrun --nproc_per_node 2 $(which moka-train) --data train.jsonl --out runs/moka
  accelerate launch --multi_gpu --num_processes 2 $(which moka-train) --data train.jsonl \
      --out runs/moka     (also on CPU, with gloo; '--cpu --num_processes 2' runs one process)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line plus a hint, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from moka_core.shapes import FAMILIES

    from .train import INITS, METHODS

    p = _Parser(
        prog="moka-train",
        description="Train a MoKA (Mixture of Kronecker Adapters) adapter over a frozen base "
        "model, loaded in 4-bit NF4 by default, and write it in the MoKA adapter format v1 "
        "(docs/adapter-format.md). --method lora trains a PEFT LoRA baseline with the same "
        "data and loop instead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("inputs and output")
    g.add_argument(
        "--base",
        metavar="MODEL",
        help="base model: a local folder or a Hugging Face id (default: the embedded "
        "SmolLM2-135M-Instruct, materialised once into the cache)",
    )
    g.add_argument("--data", required=True, metavar="FILE", help="training data (JSONL)")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder for the adapter")
    g.add_argument(
        "--eval-data",
        metavar="FILE",
        help="held-out JSONL: eval loss, and greedy exact-match accuracy for prompt/completion "
        "records, before and after training",
    )

    g = p.add_argument_group("adapter")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="moka",
        help="adapter kind (default: moka); lora and dora are PEFT's LoraConfig "
        "(dora: use_dora=True, QDoRA over the 4-bit base), the baselines",
    )
    g.add_argument(
        "--targets",
        type=_csv,
        default=["q_proj", "v_proj"],
        metavar="NAMES",
        help="comma-separated names of the linear layers to adapt, or all-linear (every linear "
        "layer but the output projection) (default: q_proj,v_proj)",
    )
    g.add_argument(
        "--components",
        type=int,
        default=4,
        metavar="R",
        help="MoKA components per layer when no --budget is given (default: 4; with the mixed "
        "family about a rank-4 LoRA's parameters)",
    )
    g.add_argument(
        "--budget",
        metavar="B",
        help="total trainable-parameter budget for automatic shapes: a percentage of the base "
        "model's parameters (0.1%%), a count (200000, 200k), or a LoRA's size on the same "
        "targets (lora-8), down to a rank-1 LoRA's size. "
        "Families lora and mixed take as many components as fit; kron takes --components "
        "shapes as large as fit",
    )
    g.add_argument(
        "--shape-family",
        choices=FAMILIES,
        default=None,
        help="automatic shapes: mixed = one balanced Kronecker component (full rank) plus "
        "rank-1 components (out x 1 kron 1 x in, each a LoRA rank); lora = rank-1 components "
        "only (exactly a LoRA); kron = diverse balanced Kronecker shapes (default: mixed, "
        "kron for --variant mokas; docs/training.md has the study behind it)",
    )
    g.add_argument(
        "--init",
        choices=INITS,
        default="lora",
        help="which factor starts at zero: lora = B (input side) Kaiming, A zero, as LoRA; "
        "a-random = A Kaiming, B zero (default: lora)",
    )
    g.add_argument(
        "--shapes",
        action="append",
        default=[],
        metavar="T=SHAPES",
        help="explicit shapes for a target: q_proj=24x24x24x24,12x48x48x12 (each component "
        "m1xn1xm2xn2: A is m1 x n1, B is m2 x n2, m1*m2 = out, n1*n2 = in); repeatable; "
        "targets without --shapes are chosen automatically",
    )
    g.add_argument(
        "--variant",
        choices=("moka", "mokas"),
        default="moka",
        help="mokas: every A is a (not stored) identity, a block-diagonal update (default: moka)",
    )
    g.add_argument(
        "--no-gating",
        dest="gating",
        action="store_false",
        help="sum the components with weight 1 instead of softmax(gate) (ablation; a single "
        "component never has a gate)",
    )
    g.add_argument(
        "--scaling",
        type=float,
        default=None,
        help="global factor on delta_W (default: 2 x the number of components with gating, "
        "2 without, so each component starts with coefficient 2 like a LoRA term with alpha "
        "= 2 x rank)",
    )
    g.add_argument("--rank", type=int, default=8, help="rank for --method lora / dora (default: 8)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")

    g = p.add_argument_group("base model")
    g.add_argument(
        "--no-quantize",
        dest="quantize",
        action="store_false",
        help="load the base in --dtype instead of 4-bit NF4 (bitsandbytes)",
    )
    g.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype; auto: bfloat16 on GPUs that support it, float32 on CPU",
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto, cpu or cuda (default: auto); one GPU per process: pick it with "
        "CUDA_VISIBLE_DEVICES, several with torchrun / accelerate launch",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads (default 0: torch's choice, all cores). On a shared machine "
        "fewer threads than cores can be much faster than threads fighting for them",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, ~30%% slower)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    g.add_argument("--batch-size", type=int, default=32, help="effective batch size (default: 32)")
    g.add_argument(
        "--micro-batch-size",
        type=int,
        default=8,
        help="examples per forward pass; batch-size/micro-batch-size gradient accumulation "
        "steps (default: 8)",
    )
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    g.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)"
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.03,
        help="fraction of steps with linear warmup, then linear decay to 0 (default: 0.03)",
    )
    g.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)"
    )
    g.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: 1)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for init and data order (default: 0)")

    g = p.add_argument_group("data")
    g.add_argument(
        "--max-length", type=int, default=512, help="tokens per record at most (default: 512)"
    )
    g.add_argument(
        "--long-records",
        choices=("truncate", "skip"),
        default="truncate",
        help="records over --max-length: truncate = cut the prompt from its left, keeping the "
        "completion (text records keep their start); skip = leave them out. Either way the run "
        "reports how many (default: truncate)",
    )
    g.add_argument(
        "--prompt-format",
        choices=("plain", "chat"),
        default="plain",
        help="prompt/completion records: plain text, or chat (prompt as the user turn, "
        "completion as the assistant turn, with the chat template) (default: plain)",
    )

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate every N steps (default: at start and end only)",
    )
    g.add_argument(
        "--no-eval-before",
        dest="eval_before",
        action="store_false",
        help="skip the evaluation of the untrained model (the plain base) before training",
    )
    g.add_argument(
        "--max-eval-examples",
        type=int,
        default=200,
        help="use at most N eval records (default: 200)",
    )
    g.add_argument("--eval-batch-size", type=int, default=16, help="eval batch size (default: 16)")
    g.add_argument("--log-every", type=int, default=1, help="log every N steps (default: 1)")
    g.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (default: never)"
    )
    g.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue from a checkpoint folder, or 'latest' (the newest in DIR/checkpoints)",
    )
    g.add_argument(
        "--report-to",
        default="none",
        metavar="LOGGERS",
        help="the Trainer's loggers, comma-separated: tensorboard, wandb, ... (default: none)",
    )
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show a progress bar (default: when stderr is a terminal)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (status lines instead, see --progress-every)",
    )
    g.add_argument(
        "--progress-every",
        type=int,
        default=0,
        metavar="N",
        help="without a bar (stderr not a terminal, or --no-progress): a status line every N "
        "steps with step, epoch, loss, tokens/s and ETA (default 0: about 20 lines per run)",
    )
    g.add_argument("--quiet", action="store_true", help="no status messages")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def config_from_args(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(
        data=args.data,
        out=args.out,
        base=args.base,
        eval_data=args.eval_data,
        method=args.method,
        targets=args.targets,
        components=args.components,
        budget=args.budget,
        shapes=args.shapes,
        variant=args.variant,
        shape_family=args.shape_family,
        init=args.init,
        gating=args.gating,
        scaling=args.scaling,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        quantize=args.quantize,
        dtype=args.dtype,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        max_length=args.max_length,
        prompt_format=args.prompt_format,
        long_records=args.long_records,
        eval_every=args.eval_every,
        eval_before=args.eval_before,
        max_eval_examples=args.max_eval_examples,
        eval_batch_size=args.eval_batch_size,
        log_every=args.log_every,
        save_every=args.save_every,
        resume=args.resume,
        progress=args.progress,
        progress_every=args.progress_every,
        threads=args.threads,
        report_to=args.report_to,
        quiet=args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train import TrainError, check_config, train

    try:
        cfg = config_from_args(args)
        check_config(cfg)  # fail fast, before the (slow) imports and model load
        train(cfg)
    except KeyboardInterrupt:
        print("moka-train: interrupted", file=sys.stderr)
        return 130
    except (TrainError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"moka-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
