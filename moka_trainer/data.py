"""Training data: JSONL records -> token ids with loss only on completion / assistant tokens.

Three record kinds, one JSON object per line (kinds may be mixed in one file):

* ``{"prompt": str, "completion": str}``: loss on the completion (and the end token).
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; loss on every assistant message.
* ``{"text": str}``: loss on every token (plain language modelling).

Every problem is reported as a :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# Used only when a tokenizer has no chat template of its own (ChatML, like SmolLM2's).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DataError(ValueError):
    """A data file problem, with file and line in the message."""


@dataclass
class Example:
    """One tokenized record. ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    kind: str
    line: int
    # For prompt/completion records, and messages records that end with an assistant turn: the
    # prompt ids (for greedy generation) and the target text.
    prompt_ids: list[int] | None = None
    completion: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Read a JSONL file into ``(line number, record)`` pairs; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(
                        f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                    )
                records.append((lineno, rec))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def record_kind(rec: dict, where: str) -> str:
    """``"prompt_completion"``, ``"messages"`` or ``"text"``; DataError for anything else."""
    keys = set(rec)
    if {"prompt", "completion"} <= keys:
        for k in ("prompt", "completion"):
            if not isinstance(rec[k], str):
                raise DataError(f"{where}: {k!r} must be a string, got {type(rec[k]).__name__}")
        if not rec["completion"]:
            raise DataError(f"{where}: 'completion' is empty (nothing to learn)")
        return "prompt_completion"
    if "messages" in keys:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise DataError(
                    f"{where}: messages[{i}] has role {m.get('role')!r}, expected one of {ROLES}"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant message (nothing to learn)")
        return "messages"
    if "text" in keys:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    if "prompt" in keys or "completion" in keys:
        missing = "completion" if "prompt" in keys else "prompt"
        raise DataError(f"{where}: has {sorted(keys)} but no {missing!r}")
    raise DataError(
        f"{where}: unknown record with keys {sorted(keys)}; expected "
        '{"prompt", "completion"}, {"messages": [...]} or {"text"}'
    )


class Tokenize:
    """Turns records into :class:`Example` for one tokenizer.

    ``prompt_format``: ``"plain"`` feeds prompt/completion text as is; ``"chat"`` renders the
    prompt as a user message with the chat template (and the completion as the assistant turn).
    """

    def __init__(self, tokenizer, *, max_length: int = 512, prompt_format: str = "plain"):
        if prompt_format not in ("plain", "chat"):
            raise ValueError(f"prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
        self.tok = tokenizer
        self.max_length = max_length
        self.prompt_format = prompt_format
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; cannot mark the end of completions")
        self._template = tokenizer.chat_template or None

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self._template or FALLBACK_CHAT_TEMPLATE,
        )

    def _prompt_ids(self, prompt: str) -> list[int]:
        if self.prompt_format == "chat":
            text = self._render([{"role": "user", "content": prompt}], True)
            return self._ids(text)
        # The tokenizer's own special tokens (e.g. a BOS) as it adds them to a plain prompt.
        return list(self.tok(prompt)["input_ids"])

    def __call__(self, rec: dict, where: str, line: int) -> Example:
        kind = record_kind(rec, where)
        if kind == "text":
            ids = list(self.tok(rec["text"])["input_ids"]) + [self.eos_id]
            ex = Example(ids, list(ids), kind, line)
        elif kind == "prompt_completion":
            p = self._prompt_ids(rec["prompt"])
            c = self._ids(rec["completion"]) + [self.eos_id]
            ex = Example(p + c, [IGNORE_INDEX] * len(p) + c, kind, line, p, rec["completion"])
        else:
            ex = self._messages(rec["messages"], where, line)
        return ex

    def _messages(self, msgs: list[dict], where: str, line: int) -> Example:
        """Label each assistant turn: the tokens between the prefix rendered with a generation
        prompt and the prefix that includes the turn (the template must render prefixes as
        prefixes, which ordinary chat templates do)."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        try:
            full = self._ids(self._render(msgs, False))
        except Exception as e:  # jinja errors, e.g. a template that rejects a role order
            raise DataError(
                f"{where}: the chat template cannot render these messages: {e}"
            ) from None
        labels = [IGNORE_INDEX] * len(full)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self._ids(self._render(msgs[:i], True))) if i else 0
            end = len(self._ids(self._render(msgs[: i + 1], False)))
            if end > len(full) or start > end:
                raise DataError(f"{where}: the chat template does not render turns as prefixes")
            labels[start:end] = full[start:end]
        ex = Example(full, labels, "messages", line)
        if msgs[-1]["role"] == "assistant":
            # Greedy eval: the rendered conversation up to the last turn's generation prompt,
            # as a chat client sends it, against the last assistant message.
            ex.prompt_ids = full[:start]
            ex.completion = msgs[-1]["content"]
        return ex


LONG_RECORDS = ("truncate", "skip")


@dataclass
class DataReport:
    """What loading did to over-long records (each one counted once)."""

    truncated: int = 0
    skipped: int = 0

    def line(self, path, max_length: int) -> str | None:
        if not (self.truncated or self.skipped):
            return None
        return (
            f"{path}: {self.truncated} records over --max-length {max_length} truncated (the "
            f"prompt cut from its left, the completion kept), {self.skipped} skipped"
        )


def fit_length(ex: Example, max_length: int, long_records: str) -> Example | None:
    """``ex`` within ``max_length`` tokens, or None to skip it.

    ``truncate``: a record with a prompt loses prompt tokens from the left (the question, the
    answer and the completion stay; real datasets put long passages first); a ``text`` record
    keeps its first ``max_length`` tokens. A record whose completion alone is too long is
    skipped either way, since no prompt would be left to generate it from. ``skip``: every
    over-long record is left out.
    """
    if len(ex.input_ids) <= max_length:
        return ex
    if long_records == "skip":
        return None
    if ex.prompt_ids is None:
        if ex.kind != "text":
            return None
        ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        return ex
    cut = len(ex.input_ids) - max_length
    if cut >= len(ex.prompt_ids):
        return None
    ex.input_ids, ex.labels = ex.input_ids[cut:], ex.labels[cut:]
    ex.prompt_ids = ex.prompt_ids[cut:]
    return ex


def load_examples(
    path: str | Path,
    tokenizer,
    *,
    max_length: int = 512,
    prompt_format: str = "plain",
    long_records: str = "truncate",
) -> tuple[list[Example], DataReport]:
    """Read and tokenize a JSONL file; DataError (with line numbers) on any bad record.
    Over-long records are truncated or skipped (``long_records``, see :func:`fit_length`) and
    counted in the report."""
    if long_records not in LONG_RECORDS:
        raise ValueError(f"long_records must be one of {LONG_RECORDS}, got {long_records!r}")
    tk = Tokenize(tokenizer, max_length=max_length, prompt_format=prompt_format)
    examples, report = [], DataReport()
    for line, rec in read_jsonl(path):
        ex = tk(rec, f"{path}:{line}", line)
        long = len(ex.input_ids) > max_length
        ex = fit_length(ex, max_length, long_records)
        if ex is None or ex.num_label_tokens == 0:
            report.skipped += 1
            continue
        report.truncated += long
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no record fits --max-length {max_length}; raise it")
    return examples, report


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, labels (pad labels ignored)."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def crop_to_labels(batch: dict[str, torch.Tensor]) -> dict:
    """Ask the model for logits only from the first position that predicts a labelled token on
    (transformers' ``logits_to_keep``), with the labels cropped to match.

    For prompt/completion data this skips the output projection, the largest matmul of a small
    model, over most prompt positions. The model's own loss stays right: it shifts the cropped
    labels by one, so the logit at position ``first`` meets the label at ``first + 1``.
    """
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    seq = labels.shape[1]
    first = int(labelled[0]) if len(labelled) else max(seq - 2, 0)
    return {**batch, "labels": labels[:, first:], "logits_to_keep": seq - first}


@dataclass
class CompletionCollator:
    """The Trainer's ``data_collator``: right-padded micro-batches cropped to their labels."""

    pad_id: int

    def __call__(self, examples: Sequence[Example]) -> dict:
        return crop_to_labels(collate(examples, self.pad_id))
