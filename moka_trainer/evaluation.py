"""Evaluation by generation for ``moka-train``: eval loss and greedy exact match, as a
``TrainerCallback`` (before training, every N steps) and a plain call (after training).

The Trainer's own ``evaluate`` computes a loss only; a user of an adapter wants to see whether
the answers come out right, so the held-out prompts are completed greedily and compared with
the expected completion, and every generation is kept for ``eval_predictions.jsonl``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from .data import IGNORE_INDEX, Example, collate


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def summed_loss(model: nn.Module, batch: dict, device: torch.device) -> tuple[float, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(loss), int((labels != IGNORE_INDEX).sum())


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
    batch_size: int,
    dtype: torch.dtype,
) -> dict:
    """Eval loss (token mean) and, for records with a prompt, greedy exact-match accuracy with
    every generation under ``eval_predictions``."""
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), _autocast(device, dtype):
            for i in range(0, len(examples), batch_size):
                chunk = examples[i : i + batch_size]
                loss, n = summed_loss(model, collate(chunk, tokenizer.pad_token_id), device)
                total += loss
                count += n
            result = {"eval_loss": total / max(count, 1), "eval_examples": len(examples)}
            pc = [e for e in examples if e.prompt_ids is not None]
            if pc:
                longest = max(len(e.input_ids) - len(e.prompt_ids) for e in pc)
                texts = greedy_completions(
                    model, tokenizer, [e.prompt_ids for e in pc], longest + 4, batch_size, device
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


def format_eval(ev: dict) -> str:
    s = f"loss {ev['eval_loss']:.4f}"
    if "eval_exact_match" in ev:
        s += f", exact match {100 * ev['eval_exact_match']:.1f}%"
    return s


class GenerationEval(TrainerCallback):
    """Evaluate before the first step (a fresh run only) and every ``every`` steps, on the main
    process; ``record(step, metrics)`` logs each result."""

    def __init__(
        self,
        tokenizer,
        examples: Sequence[Example],
        *,
        batch_size: int,
        dtype: torch.dtype,
        before: bool,
        every: int,
        record: Callable[[int, dict, str], None],
    ) -> None:
        self.tokenizer, self.examples = tokenizer, examples
        self.batch_size, self.dtype = batch_size, dtype
        self.before, self.every, self.record = before, every, record

    def _run(self, model, step: int, when: str) -> None:
        ev = evaluate(model, self.tokenizer, self.examples, self.batch_size, self.dtype)
        ev.pop("eval_predictions", None)
        self.record(step, ev, when)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.before and state.global_step == 0 and state.is_world_process_zero:
            self._run(model, 0, "before")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (
            self.every
            and step % self.every == 0
            and step != state.max_steps
            and state.is_world_process_zero
        ):
            self._run(model, step, f"step {step}")
