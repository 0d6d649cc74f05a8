"""``moka-bench`` pieces that need no server: workloads, statistics, report and compare tables."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from moka_serve.bench.client import RequestResult
from moka_serve.bench.compare import (
    adapter_params,
    compare_markdown,
    method_kind,
    moka_shapes,
    plan_configs,
    ratio_rows,
    server_command,
)
from moka_serve.bench.report import markdown, stats, summarize
from moka_serve.bench.workload import (
    WorkloadConfig,
    build_workload,
    parse_length,
    zipf_group_sizes,
)

MODELS = [f"a{i}" for i in range(64)]


def _batches(specs, batch):
    return [specs[i : i + batch] for i in range(0, len(specs), batch)]


def test_same_seed_same_workload_other_seed_differs():
    cfg = WorkloadConfig(num_requests=20, popularity="powerlaw", input_len="uniform:4:40",
                         output_len="lognormal:16:0.5", request_rate=3.0)  # fmt: skip
    assert build_workload(cfg, MODELS) == build_workload(cfg, MODELS)
    other = WorkloadConfig(**{**cfg.to_dict(), "seed": 1})
    assert build_workload(other, MODELS) != build_workload(cfg, MODELS)


def test_distinct_gives_every_request_of_a_batch_its_own_adapter():
    specs = build_workload(WorkloadConfig(num_requests=64, batch=8), MODELS)
    for b in _batches(specs, 8):
        assert len({s.model for s in b}) == 8
    assert len({s.model for s in specs}) == 64  # batches move on through the adapters


def test_identical_gives_a_batch_one_adapter():
    specs = build_workload(WorkloadConfig(num_requests=32, popularity="identical"), MODELS)
    assert [len({s.model for s in b}) for b in _batches(specs, 8)] == [1, 1, 1, 1]


def test_uniform_makes_about_sqrt_batch_equal_groups():
    specs = build_workload(WorkloadConfig(num_requests=16, popularity="uniform", batch=16), MODELS)
    assert sorted(Counter(s.model for s in specs).values()) == [4, 4, 4, 4]


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 16, 32, 64])
def test_skewed_group_sizes_follow_zipf(batch):
    sizes = zipf_group_sizes(batch)
    assert sum(sizes) == batch and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)
    specs = build_workload(
        WorkloadConfig(num_requests=batch, popularity="skewed", batch=batch), MODELS
    )
    assert sorted(Counter(s.model for s in specs).values(), reverse=True) == sizes


def test_powerlaw_stays_in_range_and_low_alpha_favours_the_first_adapters():
    cfg = WorkloadConfig(num_requests=4000, popularity="powerlaw", powerlaw_alpha=0.3)
    specs = build_workload(cfg, MODELS[:10])
    counts = Counter(s.model for s in specs)
    assert set(counts) <= set(MODELS[:10])
    # numpy.random.power(a) has density a*x^(a-1): a < 1 piles up near 0
    assert counts["a0"] > 3 * counts["a9"]


def test_fewer_adapters_than_a_batch_wrap_around():
    specs = build_workload(WorkloadConfig(num_requests=8, batch=8), MODELS[:3])
    assert set(s.model for s in specs) == set(MODELS[:3])


def test_lengths_prompts_and_arrivals():
    cfg = WorkloadConfig(num_requests=2000, input_len="uniform:8:512", output_len="7",
                         token_range=(5, 9), request_rate=50.0, burstiness_cv=2.0)  # fmt: skip
    specs = build_workload(cfg, MODELS)
    lens = [len(s.prompt) for s in specs]
    assert min(lens) >= 8 and max(lens) < 512 and len(set(lens)) > 100
    assert all(s.max_tokens == 7 for s in specs)
    assert {t for s in specs for t in s.prompt} == {5, 6, 7, 8}
    arr = np.array([s.arrival_s for s in specs])
    assert arr[0] == 0 and np.all(np.diff(arr) >= 0)
    gaps = np.diff(arr)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.15)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.25)  # burstiness cv
    closed = build_workload(WorkloadConfig(num_requests=3), MODELS)
    assert all(s.arrival_s is None for s in closed)


@pytest.mark.parametrize(
    "bad", ["0", "x", "uniform:5", "uniform:9:3", "lognormal:0:1", "gamma:1:2"]
)
def test_bad_length_specs_are_refused(bad):
    with pytest.raises(ValueError, match="bad length"):
        parse_length(bad)


def test_bad_workloads_are_refused():
    with pytest.raises(ValueError, match="popularity"):
        build_workload(WorkloadConfig(popularity="zipf"), MODELS)
    with pytest.raises(ValueError, match="no models"):
        build_workload(WorkloadConfig(), [])
    with pytest.raises(ValueError, match="rate"):
        build_workload(WorkloadConfig(request_rate=-1.0), MODELS)


def _result(i, ok=True, ttft=0.1, e2e=1.0, tokens=10, itl=(0.1, 0.1)):
    r = RequestResult(i, "m", 5, tokens, ok=ok, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens)
    r.itl_s = list(itl)
    r.error = None if ok else "boom"
    return r


def test_stats_and_summary_match_numpy():
    vals = list(np.random.default_rng(0).exponential(5.0, size=101))
    s = stats(vals)
    assert s["p50"] == pytest.approx(np.percentile(vals, 50))
    assert s["p99"] == pytest.approx(np.percentile(vals, 99))
    assert stats([])["p90"] is None
    results = [_result(0, ttft=0.2, e2e=1.1), _result(1, ttft=0.4, e2e=2.2), _result(2, ok=False)]
    summary = summarize(results, wall_s=4.0)
    assert summary["requests"] == {"total": 3, "ok": 2, "failed": 1}
    assert summary["request_throughput"] == pytest.approx(0.5)
    assert summary["output_token_throughput"] == pytest.approx(5.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(300.0)
    # TPOT = (e2e - ttft) / (tokens - 1)
    assert summary["tpot_ms"]["p50"] == pytest.approx(np.median([900 / 9, 1800 / 9]))
    assert summary["itl_ms"]["mean"] == pytest.approx(100.0)
    table = markdown(summary, "t")
    assert "2/3 ok" in table and "| tpot_ms |" in table


def test_plan_configs_puts_base_first_and_runs_n1_once():
    runs = plan_configs(["base", "moka-kron", "lora16"], [1, 8], ["distinct", "skewed"])
    assert runs == [
        ("base", 1, "-"), ("moka-kron", 1, "distinct"), ("lora16", 1, "distinct"),
        ("base", 8, "-"), ("moka-kron", 8, "distinct"), ("lora16", 8, "distinct"),
        ("moka-kron", 8, "skewed"), ("lora16", 8, "skewed"),
    ]  # fmt: skip
    runs = plan_configs(["moka-kron", "base", "plain"], [1], ["distinct"])
    assert runs == [("plain", 1, "-"), ("base", 1, "-"), ("moka-kron", 1, "distinct")]


def test_adapter_engine_adapts_only_the_targets_unless_all_layers(tmp_path):
    from moka_serve.bench.cli import build_parser

    def option(cmd: list[str], name: str) -> list[str] | None:
        if name not in cmd:
            return None
        at = cmd.index(name) + 1
        end = next((i for i in range(at, len(cmd)) if cmd[i].startswith("--")), len(cmd))
        return cmd[at:end]

    base = tmp_path / "base"
    for extra, want in (([], ["q_proj", "v_proj"]), (["--all-layers"], None)):
        args = build_parser().parse_args(["compare", "--targets", "q_proj,v_proj", *extra])
        cmd, env, _ = server_command(args, base, tmp_path, 8000, 16)
        assert option(cmd, "--lora-target-modules") == want
        assert "--enable-lora" in cmd and env["MOKA_ADAPTER_DIR"] == str(tmp_path)
        plain, _, _ = server_command(args, base, None, 8001, 0)
        assert "--enable-lora" not in plain and "--lora-target-modules" not in plain


def test_ratio_rows_divide_by_the_same_repeats_base():
    runs = [("base", 1, "-"), ("moka-kron", 1, "distinct")]

    def summ(tpot, ttft):
        return {"tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": ttft}, "output_token_throughput": 1}

    summaries = {
        runs[0]: [summ(10, 100), summ(20, 100), summ(10, 50)],
        runs[1]: [summ(11, 100), summ(22, 300), summ(12, 50)],
    }
    rows = ratio_rows(summaries, runs, 3)
    moka = rows[1]
    assert moka["tpot_ratio"] == pytest.approx(1.1)  # median of 1.1, 1.1, 1.2
    assert moka["ttft_ratio"] == pytest.approx(1.0)  # median of 1, 3, 1
    assert moka["tpot_ms"] == 12
    report = {
        "command": "moka-bench compare", "machine": {"processor": "cpu", "cpus": 2},
        "base": "/x/base", "quantize": "none", "dtype": "float32", "targets": ["q_proj"],
        "concurrency": 8, "repeats": 3, "rows": rows,
        "memory_per_adapter": {"moka-kron": {"params": 10, "adapter_bytes": 40}},
        "cold_loads": {"moka-kron": {"cold_load_ms_median": 12.0}},
        "slot_reservation_bytes": {"lora": 1e6, "moka": 2e6},
    }  # fmt: skip
    md = compare_markdown(report)
    assert "| distinct | 1 | moka-kron | 12.0 | 1.10 | - | - |" in md and "| moka-kron | 10 |" in md
    assert "| - | 1 | base | 10.0 | 1.00 |" in md


def test_ratio_rows_to_the_plain_engine():
    runs = [("plain", 1, "-"), ("base", 1, "-"), ("moka-kron", 1, "distinct")]

    def summ(tpot, ttft):
        return {"tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": ttft}, "output_token_throughput": 1}

    summaries = {
        runs[0]: [summ(8, 80), summ(16, 80)],
        runs[1]: [summ(10, 100), summ(20, 100)],
        runs[2]: [summ(11, 100), summ(22, 120)],
    }
    rows = {r["method"]: r for r in ratio_rows(summaries, runs, 2)}
    assert rows["moka-kron"]["tpot_ratio"] == pytest.approx(1.1)
    assert rows["moka-kron"]["tpot_ratio_to_plain"] == pytest.approx(11 / 8)  # 11/8 and 22/16
    assert rows["moka-kron"]["ttft_ratio_to_plain"] == pytest.approx((100 / 80 + 120 / 80) / 2)
    assert rows["base"]["tpot_ratio_to_plain"] == pytest.approx(1.25)
    assert rows["plain"]["tpot_ratio_to_plain"] == pytest.approx(1.0)


def test_adapter_params_count_factors_gates_and_lora_ranks():
    dims = {"q_proj": (576, 576), "v_proj": (192, 576)}
    shapes = {"q_proj": [[24, 24, 24, 24]] * 2, "v_proj": [[8, 24, 24, 24]] * 2}
    assert adapter_params("moka-kron", dims, 30, ["q_proj", "v_proj"], shapes) == 30 * 2 * (
        (576 + 576 + 1) + (192 + 576 + 1)
    )
    one = {"q_proj": [[576, 1, 1, 576]], "v_proj": [[192, 1, 1, 576]]}  # one term: no gate
    assert adapter_params("moka-r1", dims, 30, ["q_proj", "v_proj"], one) == 30 * (1152 + 768)
    assert adapter_params("lora16", dims, 30, ["q_proj", "v_proj"], shapes) == 30 * 16 * (
        1152 + 768
    )
    assert math.isclose(
        adapter_params("lora8", dims, 30, ["q_proj"], shapes) * 2,
        adapter_params("lora16", dims, 30, ["q_proj"], shapes),
    )


def test_moka_methods_are_the_adapters_moka_train_makes():
    """moka-rR: moka-train's mixed family at a rank-R LoRA's size (a balanced term plus R-1
    rank-1 terms on SmolLM2's q/v), within the budget's slack of the LoRA's parameter count;
    moka-kron: the kron family's balanced terms; unknown names are refused."""
    dims = {"q_proj": (576, 576), "v_proj": (192, 576)}
    targets = ["q_proj", "v_proj"]
    for r in (2, 8):
        shapes = moka_shapes(dims, 30, targets, f"moka-r{r}", components=4)
        assert shapes["q_proj"][0] == [24, 24, 24, 24]
        assert shapes["q_proj"][1:] == [[576, 1, 1, 576]] * (r - 1)
        moka = adapter_params(f"moka-r{r}", dims, 30, targets, shapes)
        lora = adapter_params(f"lora{r}", dims, 30, targets, shapes)
        assert 0.9 * lora < moka <= 1.005 * lora
    kron = moka_shapes(dims, 30, targets, "moka-kron", components=4)
    assert all(len(v) == 4 and 1 not in v[0] for v in kron.values())
    assert method_kind("moka-r8") == ("moka-mixed", 8) and method_kind("lora16") == ("lora", 16)
    for bad in ("moka", "moka-r0", "lora17", "moka-r2x"):
        with pytest.raises(ValueError, match="unknown method"):
            method_kind(bad)


def test_moka_rows_get_the_same_size_lora_ratio():
    runs = [("base", 8, "-"), ("moka-r2", 8, "distinct"), ("lora2", 8, "distinct"),
            ("moka-kron", 8, "distinct")]  # fmt: skip

    def summ(tpot):
        return {"tpot_ms": {"p50": tpot}, "ttft_ms": {"p50": 10}, "output_token_throughput": 1}

    summaries = {
        runs[0]: [summ(10), summ(20), summ(10)],
        runs[1]: [summ(11), summ(20), summ(12)],
        runs[2]: [summ(22), summ(20), summ(15)],
        runs[3]: [summ(11), summ(20), summ(12)],
    }
    rows = {r["method"]: r for r in ratio_rows(summaries, runs, 3)}
    assert rows["moka-r2"]["tpot_ratio_to_lora"] == pytest.approx(0.8)  # 0.5, 1.0, 0.8
    assert "tpot_ratio_to_lora" not in rows["moka-kron"]
    assert "tpot_ratio_to_lora" not in rows["lora2"]


def test_lora_slot_bytes_splits_per_tensor_parallel_rank():
    """One formula for moka-serve's slot sizing and compare's report: A full and B split on
    column-parallel layers, A split and B full on row-parallel o/down; edges at every rank."""
    from moka_core.slots import lora_slot_bytes

    dims = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8),
            "gate_proj": (16, 8), "up_proj": (16, 8), "down_proj": (8, 16)}  # fmt: skip
    # rank 2, 1 layer: qkv 2*(3*8 + 16), o 2*(8 + 8), gate_up 2*(2*8 + 32), down 2*(16 + 8)
    per_layer = 2 * (24 + 16) + 2 * 16 + 2 * 48 + 2 * 24
    assert lora_slot_bytes(dims, 1, None, 2, 4) == per_layer * 4
    assert lora_slot_bytes(dims, 1, 10, 2, 4) == (per_layer + 2 * 2 * (10 + 8)) * 4
    tp2 = 2 * (24 + 8) + 2 * (4 + 8) + 2 * (16 + 16) + 2 * (8 + 8)
    assert lora_slot_bytes(dims, 1, None, 2, 4, tp=2) == tp2 * 4


def test_table_slot_bytes_is_one_bank_row_per_entry_a_slot_can_hold(monkeypatch):
    """The planner's slot-table bytes: the bank's row size (NUM_FIELDS int32 fields) times
    MOKA_MAX_COMPONENTS entries per output slice (q, k, v, o, gate, up, down) and layer."""
    from moka_core.slots import TABLE_ROW_BYTES, table_slot_bytes
    from moka_kernels.bank import NUM_FIELDS

    assert TABLE_ROW_BYTES == NUM_FIELDS * 4
    monkeypatch.setenv("MOKA_MAX_COMPONENTS", "3")
    assert table_slot_bytes(2) == 2 * 7 * 3 * NUM_FIELDS * 4


def test_soak_verdict_allows_a_404_only_while_its_adapter_is_being_unloaded():
    """A request racing an HTTP unload of its adapter may get 404 (as in plain vLLM); a 400
    then, or a 404 outside the unload, is still an unexpected failure."""
    from moka_serve.bench.soak import FolderHistory, Outcome, verdict

    unloads = FolderHistory(changes={"a": [(10.0, True), (10.2, False)]})
    run = {"t0": 0.0, "admin": [], "health": [(0.0, 200)], "rss": [],
           "requests": [Outcome("a", 10.1, 10.15, 404), Outcome("a", 11.0, 11.1, 404),
                        Outcome("a", 10.05, 10.1, 400)]}  # fmt: skip
    figures = verdict(run, {"a"}, FolderHistory(), 12.0, unloads)["figures"]
    assert figures["unexpected_failures"] == 2, figures
    figures = verdict(run, {"a"}, FolderHistory(), 12.0)["figures"]
    assert figures["unexpected_failures"] == 3, figures


def test_compare_refuses_negative_cold_loads_and_reports_none_as_a_dash():
    """``--cold-loads 0`` runs no cold load (the table says ``-``); a negative count is refused
    before any server starts (it used to fail after both had started)."""
    from moka_serve.bench.cli import build_parser
    from moka_serve.bench.compare import cmd_compare
    from moka_serve.bench.serve import BenchError

    args = build_parser().parse_args(["compare", "--methods", "moka-r2", "--cold-loads", "-1"])
    with pytest.raises(BenchError, match="--cold-loads"):
        cmd_compare(args)
    report = {
        "command": "moka-bench compare", "machine": {"processor": "cpu", "cpus": 2},
        "base": "/x/base", "quantize": "none", "dtype": "float32", "targets": ["q_proj"],
        "concurrency": 8, "repeats": 1, "rows": [],
        "memory_per_adapter": {"moka-r2": {"params": 10, "adapter_bytes": 40}},
        "cold_loads": {}, "slot_reservation_bytes": {"lora": 1e6, "moka": 2e6},
    }  # fmt: skip
    assert "| moka-r2 | 10 | 0.00 MB | - |" in compare_markdown(report)
