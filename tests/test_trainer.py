"""moka-train end to end on the tiny random Llama with a 4-bit NF4 base (CPU, ~1 minute)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moka_core.adapter_format import load_adapter
from moka_core.base_models import tiny_llama_dir
from moka_peft import MokaPeftConfig
from moka_peft.layer import MokaLinear
from moka_peft.planning import target_dims
from moka_trainer.base_model import load_base_model
from moka_trainer.cli import main as cli_main
from moka_trainer.data import IGNORE_INDEX, DataError, load_examples
from moka_trainer.train import TrainConfig, Trained, train_model

CPU = torch.device("cpu")
WORDS = "red green blue black white water fire earth wind stone tree bird".split()


def _write_task(path: Path, n: int, seed: int) -> None:
    """A copy-twice task: prompt 'Echo: w1 w2' -> 'w1 w2 w1 w2'. Learnable in a few steps."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ws = " ".join(rng.choice(WORDS) for _ in range(2))
            f.write(json.dumps({"prompt": f"Echo: {ws}\n", "completion": f"{ws} {ws}"}) + "\n")


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_llama_dir()


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("task")
    _write_task(d / "train.jsonl", 32, 0)
    _write_task(d / "eval.jsonl", 6, 1)
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl", "dir": d}


def _cfg(tiny: Path, task: dict, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(task["train"]),
        out=str(out),
        base=str(tiny),
        max_steps=4,
        batch_size=8,
        micro_batch_size=4,
        lr=1e-2,
        warmup_ratio=0.0,
        quiet=True,
        progress=False,
        max_eval_examples=4,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny, task, tmp_path_factory) -> Trained:
    out = tmp_path_factory.mktemp("run") / "moka"
    return train_model(_cfg(tiny, task, out, eval_data=str(task["eval"]), save_every=2))


def _attach(model, folder: Path):
    """A saved adapter on a fresh base, through PEFT (moka_peft registers MoKA)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder)).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 512, 3], [8, 1, 2, 3, 4, 5, 6, 7]])


def test_training_lowers_loss_on_a_4bit_base(trained):
    out = Path(trained.summary["config"]["out"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(e) for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [e for e in log if "eval_loss" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 4
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "eval_exact_match" in evals[-1]
    # the base really is 4-bit, and only the MoKA factors trained
    model = trained.model
    mods = [m for m in model.modules() if isinstance(m, MokaLinear)]
    assert len(mods) == 8 and all(type(m.get_base_layer()).__name__ == "Linear4bit" for m in mods)
    info = json.loads((out / "train_info.json").read_text())
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["quantized_4bit"] and info["lora_params_same_targets"]["rank8"] > 0


def test_delta_w_is_zero_at_step_0(tiny):
    model, _ = load_base_model(str(tiny), quantize=True, device=CPU, dtype=torch.float32)
    before = _logits(model, IDS)
    from peft import get_peft_model

    model = get_peft_model(model, MokaPeftConfig(target_modules=["q_proj", "v_proj"], components=3))
    wrapped = [m for m in model.modules() if isinstance(m, MokaLinear)]
    assert len(wrapped) == 8
    assert all(torch.count_nonzero(m.get_delta_weight("default")) == 0 for m in wrapped)
    assert torch.equal(_logits(model, IDS), before)


def test_saved_adapter_reproduces_logits_unmerged_and_merged(trained, tiny):
    out = Path(trained.summary["config"]["out"])
    trained.model.eval()
    want = _logits(trained.model, IDS)
    fresh, _ = load_base_model(str(tiny), quantize=True, device=CPU, dtype=torch.float32)
    base_logits = _logits(fresh, IDS)
    dims, _ = target_dims(fresh, ["q_proj", "v_proj"])
    adapter = load_adapter(out, base_dims=dims)
    assert adapter.config.gating and len(adapter.modules) == 8
    assert (want - base_logits).abs().max() > 1e-3, "the adapter should change the model"
    # the gates moved away from uniform during training
    gates = [w.gate for w in adapter.modules.values()]
    assert any(not torch.allclose(g, torch.zeros_like(g)) for g in gates)

    torch.testing.assert_close(_logits(_attach(fresh, out), IDS), want, rtol=0, atol=1e-5)

    reference = pytest.importorskip("moka_core.reference")
    merged, _ = load_base_model(str(tiny), quantize=True, device=CPU, dtype=torch.float32)
    merged = reference.merge_moka_into_model(merged, adapter) or merged
    # merged = dequantized NF4 weights + delta_W: same math, another summation order
    torch.testing.assert_close(_logits(merged, IDS), want, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("method", ["moka", "lora"])
def test_resume_continues_exactly(tiny, task, tmp_path, method):
    """MoKA and LoRA go through the one Trainer path: both checkpoint, and a run resumed from
    its step-2 checkpoint ends with exactly the uninterrupted run's adapter."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    full = train_model(_cfg(tiny, task, tmp_path / "full", method=method, save_every=2))
    ckpt = Path(get_last_checkpoint(str(tmp_path / "full" / "checkpoints")))
    assert ckpt.name == "checkpoint-4" and (ckpt / "adapter_config.json").is_file()
    part = tmp_path / "part" / "checkpoints"
    part.mkdir(parents=True)
    shutil.copytree(ckpt.with_name("checkpoint-2"), part / "checkpoint-2")
    resumed = train_model(_cfg(tiny, task, tmp_path / "part", method=method, resume="latest"))
    assert resumed.summary["resumed_from_step"] == 2 and resumed.summary["steps"] == 4
    # it went on from step 3 (a run started over would log step 1's loss first)
    full_log = [
        json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    ]
    step3 = next(e["loss"] for e in full_log if e.get("step") == 3 and "loss" in e)
    assert resumed.summary["first_loss"] == step3
    assert type(resumed.model) is type(full.model)
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_baseline_saves_a_peft_folder(tiny, task, tmp_path, method):
    """The LoRA baselines (QLoRA, and QDoRA with --method dora: PEFT's use_dora, one magnitude
    per output row) train over the 4-bit base through the same Trainer path and reload."""
    from peft import PeftModel

    out = tmp_path / method
    res = train_model(_cfg(tiny, task, out, method=method, rank=4, max_steps=2))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert cfg["use_dora"] is (method == "dora")
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    magnitudes = 4 * (256 + 128) if method == "dora" else 0
    assert res.summary["trainable_params"] == 4 * 4 * ((256 + 256) + (256 + 128)) + magnitudes
    res.model.eval()
    want = _logits(res.model, IDS)
    base, _ = load_base_model(str(tiny), quantize=True, device=CPU, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(_logits(loaded, IDS), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- data


def test_loss_only_on_completion_and_assistant_tokens(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    f = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "Echo: red\n", "completion": "red red"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "world"},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "model adapter"},
            ]
        },
        {"text": "the capital of France"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pc, msg, text), _ = load_examples(f, tok)
    labelled = [t for t in pc.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "red red" + tok.eos_token
    assert pc.labels[: len(pc.prompt_ids)] == [IGNORE_INDEX] * len(pc.prompt_ids)
    spans, cur = [], []
    for t, lab in zip(msg.input_ids, msg.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    assert [tok.decode(s).strip() for s in spans] == ["world<|im_end|>", "model adapter<|im_end|>"]
    assert text.labels == text.input_ids
    chat = load_examples(f, tok, prompt_format="chat")[0][0]
    assert tok.decode(chat.prompt_ids).startswith("<|im_start|>user\nEcho: red")


@pytest.mark.parametrize(
    "line,msg",
    [
        ('{"prompt": "a"}', "no 'completion'"),
        ('{"prompt": 1, "completion": "b"}', "'prompt' must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
        ('{"foo": 1}', "unknown record"),
        ('{"text": ""}', "non-empty"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_data_lines_name_the_line(tiny, tmp_path, line, msg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=msg) as e:
        load_examples(f, tok)
    assert "bad.jsonl:2:" in str(e.value)


# --------------------------------------------------------------------------- CLI


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = cli_main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def test_cli_rejects_bad_options_clearly(tiny, task, tmp_path, capsys):
    common = ["--base", str(tiny), "--data", str(task["train"]), "--out", str(tmp_path / "o")]
    cases = [
        (["--batch-size", "30", "--micro-batch-size", "8"], "multiple of --micro-batch-size"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--shapes", "q_proj=24x24"], "M1xN1xM2xN2"),
        (["--budget", "lots"], "--budget"),
        (["--method", "lora", "--budget", "1%"], "apply to --method moka only"),
        (["--method", "qlora"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    ]
    for extra, msg in cases:
        rc, err = _run_cli(capsys, *common, *extra)
        assert rc == 2, (extra, err)
        assert msg in err, (extra, err)
        assert "Traceback" not in err
    rc, err = _run_cli(
        capsys,
        "--base",
        str(tmp_path / "nope"),
        "--data",
        str(task["train"]),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "no such model folder" in err
    rc, err = _run_cli(capsys, *common[:2], "--data", str(tmp_path / "x.jsonl"), "--out", "o")
    assert rc == 2 and "no such file" in err
    rc, err = _run_cli(capsys, "--data", str(task["train"]))
    assert rc == 2 and "--out" in err


def test_cli_errors_found_after_loading_the_model(tiny, task, tmp_path, capsys):
    common = ["--base", str(tiny), "--data", str(task["train"]), "--out", str(tmp_path / "o")]
    rc, err = _run_cli(capsys, *common, "--shapes", "q_proj=16x16x16x15", "--quiet")
    assert rc == 2 and "n1*n2 must be 256" in err and "valid examples" in err
    rc, err = _run_cli(capsys, *common, "--targets", "q_proj,wq", "--quiet")
    assert rc == 2 and "['wq'] match no linear layer" in err


def test_cli_subprocess_bad_data_line_no_traceback(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completon": "b"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moka_trainer.cli",
            "--base",
            str(tiny),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "d.jsonl:2:" in proc.stderr and "no 'completion'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_explains_options():
    proc = subprocess.run(
        [sys.executable, "-m", "moka_trainer.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for opt in [
        "--base",
        "--data",
        "--out",
        "--budget",
        "--shapes",
        "--method",
        "--rank",
        "--no-quantize",
        "--resume",
        "--save-every",
        "--gradient-checkpointing",
        "--threads",
        "--progress-every",
        "--shape-family",
        "--init",
        "eval_predictions.jsonl",
    ]:
        assert opt in proc.stdout


def test_mokas_ungated_plain_base_with_gradient_checkpointing(tiny, task, tmp_path):
    out = tmp_path / "mokas"
    res = train_model(
        _cfg(
            tiny,
            task,
            out,
            variant="mokas",
            gating=False,
            quantize=False,
            scaling=2.0,
            gradient_checkpointing=True,
            max_steps=2,
            components=2,
            budget="2k",
        )
    )
    assert res.summary["last_loss"] < res.summary["first_loss"]
    res.model.eval()
    want = _logits(res.model, IDS)
    adapter = load_adapter(out)
    assert adapter.config.variant == "mokas" and not adapter.config.gating
    assert adapter.config.scaling == 2.0
    assert all(a is None for w in adapter.modules.values() for a in w.A)
    assert adapter.num_parameters() == res.summary["trainable_params"]
    fresh, _ = load_base_model(str(tiny), quantize=False, device=CPU, dtype=torch.float32)
    torch.testing.assert_close(_logits(_attach(fresh, out), IDS), want, rtol=0, atol=1e-5)


def test_cli_resume_latest_rewrites_the_log(trained, tiny, task, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained.summary["config"]["out"], out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    rc, err = _run_cli(
        capsys,
        "--base",
        str(tiny),
        "--data",
        str(task["train"]),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup-ratio",
        "0",
        "--resume",
        "latest",
    )
    assert rc == 0, err
    assert "resuming from" in err and "checkpoint-2 at step 2" in err
    assert "trainable parameters:" in err and "rank-8 LoRA on the same targets" in err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]
    a, b = load_adapter(trained.summary["config"]["out"]), load_adapter(out)
    for path, wa in a.modules.items():
        torch.testing.assert_close(wa.B[0], b.modules[path].B[0], rtol=1e-5, atol=1e-6)


def test_eval_predictions_file_and_epoch_counter(trained):
    """Every held-out generation is saved; the log's epoch reaches 1.0 at the last step."""
    out = Path(trained.summary["config"]["out"])
    preds = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4  # max_eval_examples
    assert all(set(p) == {"line", "prompt", "expected", "generated", "correct"} for p in preds)
    assert all(p["prompt"].startswith("Echo: ") for p in preds)
    assert all(p["correct"] == (p["generated"].strip() == p["expected"].strip()) for p in preds)
    assert sum(p["correct"] for p in preds) / 4 == trained.summary["after"]["eval_exact_match"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # 4 steps of 8 over 32 records: one epoch exactly.
    assert [e["epoch"] for e in log if "loss" in e] == [0.25, 0.5, 0.75, 1.0]


def test_progress_lines_without_a_terminal_and_chat_records_evaluated(tiny, tmp_path, capsys):
    """stderr is not a TTY here: status lines every N steps instead of a bar. Messages records
    that end with an assistant turn get greedy exact-match like prompt/completion ones."""
    rows = [
        {"messages": [{"role": "user", "content": f"Echo: {w}"},
                      {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc, err = _run_cli(
        capsys, "--base", str(tiny), "--data", str(data), "--eval-data", str(data), "--out",
        str(out), "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "4",
        "--progress-every", "2", "--threads", "1", "--max-eval-examples", "3", "--no-eval-before",
    )  # fmt: skip
    assert rc == 0, err
    lines = [x for x in err.splitlines() if x.startswith("[moka-train] step ")]
    assert [x.split()[2] for x in lines] == ["2/4", "4/4"], err
    assert all("loss" in x and "tokens/s" in x and "eta" in x for x in lines)
    assert "epoch 1.33" in lines[-1]  # 4 steps of 4 over 12 records
    preds = [json.loads(x) for x in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and "<|im_start|>assistant" in preds[0]["prompt"]
    assert preds[0]["expected"] == "red red"
    info = json.loads((out / "train_info.json").read_text())
    assert "eval_exact_match" in info["after"]


@pytest.mark.parametrize("family", ["mixed", "lora"])
def test_budget_of_a_rank_1_lora_gives_one_ungated_component(tiny, task, tmp_path, family):
    """The budget search reaches a rank-1 LoRA's size: one rank-1 component, no gate."""
    model, _ = load_base_model(str(tiny), quantize=True, device=CPU, dtype=torch.float32)
    dims, counts = target_dims(model, ["q_proj", "v_proj"])
    rank1 = sum((o + i) * counts[t] for t, (o, i) in dims.items())
    del model
    cfg = _cfg(tiny, task, tmp_path / "r1", budget=str(rank1), shape_family=family, max_steps=1)
    res = train_model(cfg)
    assert res.summary["trainable_params"] == rank1 and res.summary["gating"] is False
    mods = [m for m in res.model.modules() if isinstance(m, MokaLinear)]
    assert mods and all(not m.moka_gate and len(m.moka_shapes["default"]) == 1 for m in mods)
    assert all(m.moka_shapes["default"][0].n1 == 1 for m in mods)
    assert all(m.moka_shapes["default"][0].m2 == 1 for m in mods)
    saved = load_adapter(tmp_path / "r1")
    assert saved.config.gating is False
    # Twice the budget: two components, gated (the gate logits fit in the 0.5% over).
    cfg = _cfg(tiny, task, tmp_path / "r2", budget=str(int(2 * rank1 * 1.005)),
               shape_family=family, max_steps=1)  # fmt: skip
    res = train_model(cfg)
    assert res.summary["gating"] is True
    mods = [m for m in res.model.modules() if isinstance(m, MokaLinear)]
    assert mods and all(len(m.moka_shapes["default"]) == 2 for m in mods)


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_long_records_keep_their_completion_or_are_skipped_and_counted(tiny, tmp_path, mode):
    """A record over --max-length loses prompt tokens from the left (its completion intact) or
    is skipped; a record whose completion alone is too long is skipped either way."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    passage = " ".join(WORDS * 20)
    rows = [
        {"prompt": f"{passage}\nQuestion: first colour?\n", "completion": "red"},
        {"prompt": "Echo: red\n", "completion": "red red"},
        {"prompt": "Q\n", "completion": passage},
        {"text": passage},
    ]
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_examples(f, tok, max_length=64, long_records=mode)
    assert all(len(e.input_ids) <= 64 for e in examples)
    if mode == "skip":
        assert [e.line for e in examples] == [2] and (report.truncated, report.skipped) == (0, 3)
        return
    assert [e.line for e in examples] == [1, 2, 4] and (report.truncated, report.skipped) == (2, 1)
    long = examples[0]
    labelled = [
        t for t, lab in zip(long.input_ids, long.labels, strict=True) if lab != IGNORE_INDEX
    ]
    assert tok.decode(labelled) == "red" + tok.eos_token
    assert tok.decode(long.prompt_ids).endswith("Question: first colour?\n")
    assert long.input_ids[: len(long.prompt_ids)] == long.prompt_ids
    assert examples[2].input_ids == tok(passage)["input_ids"][:64]


def test_cli_reports_long_records(tiny, task, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(task["train"].read_text() + json.dumps(
        {"prompt": " ".join(WORDS * 30) + "\n", "completion": "red"}) + "\n")  # fmt: skip
    rc, err = _run_cli(capsys, "--base", str(tiny), "--data", str(data), "--out",
                       str(tmp_path / "o"), "--max-steps", "1", "--max-length", "48")  # fmt: skip
    assert rc == 0, err
    assert "1 records over --max-length 48 truncated" in err and "0 skipped" in err
    info = json.loads((tmp_path / "o" / "train_info.json").read_text())
    assert (info["records_truncated"], info["records_skipped"]) == (1, 0)


def test_two_processes_train_the_same_adapter_as_one(tiny, task, tmp_path):
    """``torchrun --nproc_per_node 2 moka-train`` (gloo on CPU, a 4-bit base): each process
    takes every other micro-batch of the same sampled order, and the loss is normalised by the
    global count of completion tokens, so with the same global batch and seed the adapter equals
    a one-process run's up to float32 summation order."""
    from safetensors.torch import load_file

    common = ["--base", str(tiny), "--data", str(task["train"]), "--max-steps", "3",
              "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2", "--threads", "1",
              "--quiet"]  # fmt: skip
    exe = str(Path(sys.executable).with_name("moka-train"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", exe, *common,
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([exe, *common, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "train_info.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 3
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(torch.count_nonzero(a[k]) for k in a if "moka_A" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "train_log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
