"""Fast unit tests of moka-train's pieces: shapes, the MoKA layer (``moka_peft``'s, the one layer
moka-train trains), data parsing (no model load)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moka_core.adapter_format import ComponentShape
from moka_core.shapes import (
    all_factorisations,
    check_shapes,
    choose_components,
    divisors,
    family_components,
    lora_params,
    module_params,
    parse_budget,
    parse_shapes,
    plan_shapes,
    rank_one_shape,
)
from moka_trainer.data import DataError, read_jsonl

pytest.importorskip("peft")
from moka_peft.layer import MokaLinear  # noqa: E402

AD = "default"


def _layer(base: nn.Module, comps, **kw) -> MokaLinear:
    """A MoKA layer around a frozen ``base`` with defaults as PEFT passes them."""
    base.requires_grad_(False)
    opts = {"gating": True, "scaling": 1.0, "variant": "moka", "init": "lora", **kw}
    return MokaLinear(base, AD, list(comps), **opts)


def _a(m: MokaLinear, i: int) -> torch.Tensor:
    return m.moka_A[AD][i].weight


def _b(m: MokaLinear, i: int) -> torch.Tensor:
    return m.moka_B[AD][i].weight


def _dense64(m: MokaLinear) -> torch.Tensor:
    """float64 ``sum_i c_i kron(A_i, B_i)`` straight from the parameters (torch.kron)."""
    coeff = m.coefficients(AD).detach().double()
    dw = 0
    for i, c in enumerate(m.moka_shapes[AD]):
        a = torch.eye(c.m1, dtype=torch.float64) if AD not in m.moka_A else _a(m, i).double()
        dw = dw + coeff[i] * torch.kron(a.detach(), _b(m, i).detach().double())
    return dw


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "out_f,in_f",
    [(576, 576), (192, 576), (576, 1536), (1536, 576), (256, 128), (97, 576), (7, 13), (255, 255)],
)
@pytest.mark.parametrize("budget", [None, 2_000, 50_000])
def test_chosen_shapes_are_exact_distinct_factorisations(out_f, in_f, budget):
    shapes, notes = plan_shapes(
        {"t": (out_f, in_f)}, {"t": 3}, num_components=4, budget=budget and 3 * budget
    )
    comps = shapes["t"]
    assert len(comps) == 4
    assert len(set(comps)) == 4, comps
    for c in comps:
        assert c.m1 * c.m2 == out_f and c.n1 * c.n2 == in_f
    if budget is not None and not notes:
        assert module_params(comps, "moka", True) <= budget


def test_smollm2_dims_and_budget():
    # SmolLM2-135M: q_proj 576x576, v_proj 192x576 (out x in), 30 layers each.
    dims, counts = {"q_proj": (576, 576), "v_proj": (192, 576)}, {"q_proj": 30, "v_proj": 30}
    budget = parse_budget("0.3%", 134_515_008)
    shapes, notes = plan_shapes(dims, counts, num_components=4, budget=budget)
    assert not notes
    total = sum(module_params(shapes[t], "moka", True) * counts[t] for t in dims)
    assert total <= budget
    assert total > 0.5 * budget  # the budget is used, not wasted
    assert total < lora_params(dims, counts, 8)
    # Too small a budget: the cheapest diverse set, with a note saying so.
    shapes, notes = plan_shapes(dims, counts, num_components=4, budget=1000)
    assert notes and "budget too small" in notes[0]
    assert shapes["q_proj"][0] == ComponentShape(24, 24, 24, 24)


def test_mokas_shapes_have_square_identity():
    for out_f, in_f in [(576, 576), (192, 576), (256, 128)]:
        comps, _ = choose_components(out_f, in_f, 3, 1e9, variant="mokas")
        assert all(c.m1 == c.n1 for c in comps)
        assert all(c.m1 * c.m2 == out_f and c.n1 * c.n2 == in_f for c in comps)


def test_divisors_and_factorisations():
    assert divisors(576)[:6] == [1, 2, 3, 4, 6, 8] and divisors(576)[-1] == 576
    assert len(divisors(576)) == 21
    assert all(c.m1 >= 2 and c.n2 >= 2 for c in all_factorisations(576, 192))
    # a prime has only the trivial split
    assert {c.m1 for c in all_factorisations(13, 4)} == {1, 13}


def test_parse_shapes_and_errors():
    got = parse_shapes(["q_proj=24x24x24x24,12x48x48x12", "v_proj=12x24x16x24; k_proj=2x2x2x2"])
    assert got["q_proj"] == [ComponentShape(24, 24, 24, 24), ComponentShape(12, 48, 48, 12)]
    assert set(got) == {"q_proj", "v_proj", "k_proj"}
    for bad, msg in [
        ("q_proj", "TARGET="),
        ("q_proj=24x24x24", "M1xN1xM2xN2"),
        ("q_proj=0x1x1x1", "positive"),
        ("a.b=2x2x2x2", "module name"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_shapes([bad])
    # The same shape twice is allowed: two rank-1 components are a rank-2 LoRA.
    assert parse_shapes(["q_proj=8x1x1x8,8x1x1x8"])["q_proj"] == [ComponentShape(8, 1, 1, 8)] * 2
    with pytest.raises(ValueError, match="m1\\*m2 must be 576"):
        check_shapes("q_proj", 576, 576, [ComponentShape(24, 24, 23, 24)])
    with pytest.raises(ValueError, match="not among the targets"):
        plan_shapes(
            {"q_proj": (8, 8)},
            {"q_proj": 1},
            num_components=1,
            budget=None,
            explicit={"o_proj": [ComponentShape(2, 2, 4, 4)]},
        )


def test_parse_budget():
    assert parse_budget("0.1%", 1_000_000) == pytest.approx(1000)
    assert parse_budget("250k", 1) == 250_000
    assert parse_budget("1.5m", 1) == 1_500_000
    assert parse_budget("1234", 1) == 1234
    for bad in ["abc", "-1", "0%", "nan"]:
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad, 100)


# --------------------------------------------------------------------------- the layer


def _random_factors(m: MokaLinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["moka", "mokas"])
@pytest.mark.parametrize("gating", [True, False])
def test_moka_linear_matches_kron_reference(variant, gating):
    torch.manual_seed(0)
    base = nn.Linear(576, 192, bias=True)
    comps, _ = choose_components(192, 576, 3, 1e9 if variant == "mokas" else 5000, variant=variant)
    m = _layer(base, comps, gating=gating, variant=variant, scaling=0.5)
    x = torch.randn(2, 5, 576)
    assert torch.equal(m(x), base(x)), "delta_W must be exactly zero at step 0"
    assert torch.count_nonzero(_dense64(m)) == 0
    _random_factors(m)
    ref = base(x).double() + x.double() @ _dense64(m).T
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m.get_delta_weight(AD).double(), _dense64(m), rtol=1e-5, atol=1e-5)
    m.enable_adapters(False)
    assert torch.equal(m(x), base(x))


def test_factors_stay_float32_over_bf16_base():
    base = nn.Linear(64, 32).to(torch.bfloat16)
    m = _layer(base, [ComponentShape(4, 8, 8, 8), ComponentShape(8, 4, 4, 16)])
    assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if "moka" in n)
    y = m(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_gates_are_trainable_and_softmax_sums_to_one():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    m = _layer(base, [ComponentShape(8, 8, 8, 8), ComponentShape(4, 16, 16, 4)])
    gate = m.moka_gate[AD]
    assert gate.requires_grad
    torch.testing.assert_close(m.coefficients(AD).sum(), torch.tensor(1.0))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 64), torch.randn(16, 64)
    for _ in range(5):
        opt.zero_grad()
        ((m(x) - target) ** 2).mean().backward()
        opt.step()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert not torch.allclose(gate, torch.zeros(2))
    alpha = torch.softmax(gate, 0)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0))
    assert not torch.allclose(alpha, torch.full((2,), 0.5))


# --------------------------------------------------------------------------- data


def test_read_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "ok"\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        read_jsonl(f)
    f.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object"):
        read_jsonl(f)
    f.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(f)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- shape families

SMOL = {"q_proj": (576, 576), "v_proj": (192, 576)}
SMOL_COUNTS = {"q_proj": 30, "v_proj": 30}


@pytest.mark.parametrize("family", ["lora", "mixed"])
@pytest.mark.parametrize("rank", [1, 2, 3, 8])
def test_family_budgets_reach_down_to_a_rank_1_lora(family, rank):
    """At a rank-r LoRA's size, lora/mixed use r components and never exceed the budget."""
    budget = lora_params(SMOL, SMOL_COUNTS, rank) + (2 * 30 * rank if rank > 1 else 0)
    shapes, notes = plan_shapes(SMOL, SMOL_COUNTS, num_components=4, budget=budget, family=family)
    assert notes == []
    for t, (o, i) in SMOL.items():
        assert len(shapes[t]) == rank
        assert all(c.m1 * c.m2 == o and c.n1 * c.n2 == i for c in shapes[t])
        ones = [c for c in shapes[t] if c == rank_one_shape(o, i)]
        assert len(ones) == (rank if family == "lora" or rank == 1 else rank - 1)
    total = sum(module_params(shapes[t], "moka", rank > 1) * SMOL_COUNTS[t] for t in SMOL)
    assert total <= budget
    # A budget below one rank-1 term says so and uses one.
    shapes, notes = plan_shapes(SMOL, SMOL_COUNTS, num_components=4, budget=1000, family=family)
    assert all(len(v) == 1 for v in shapes.values()) and notes


def test_mixed_family_is_one_balanced_kronecker_term_plus_rank_1_terms():
    shapes = family_components(576, 576, "mixed", 4)
    assert shapes[0] == ComponentShape(24, 24, 24, 24)
    assert shapes[1:] == [ComponentShape(576, 1, 1, 576)] * 3
    # Default (no budget): --components of them, about a rank-4 LoRA's size on SmolLM2 q/v.
    shapes, _ = plan_shapes(SMOL, SMOL_COUNTS, num_components=4, budget=None, family="mixed")
    n = sum(module_params(shapes[t], "moka", True) * 30 for t in SMOL)
    assert 0.95 < n / lora_params(SMOL, SMOL_COUNTS, 4) <= 1.0


def _lora_like(m: MokaLinear) -> torch.Tensor:
    """delta_W of rank-1 components read as a LoRA: B_lora = [a_i c_i], A_lora = [b_i]."""
    coeff = m.coefficients(AD).detach().double()
    n = len(m.moka_shapes[AD])
    a = torch.cat([_a(m, i).double() * coeff[i] for i in range(n)], dim=1)
    b = torch.cat([_b(m, i).double() for i in range(n)], dim=0)
    return a.detach() @ b.detach()


@pytest.mark.parametrize("init", ["lora", "a-random"])
@pytest.mark.parametrize("gating", [True, False])
def test_grouped_rank_1_and_kronecker_components_match_torch_kron(init, gating):
    """Rank-1 components are computed together: compare with float64 torch.kron, odd dims."""
    torch.manual_seed(1)
    out_f, in_f = 35, 21  # odd: 5x7 by 3x7 factorisations
    comps = [ComponentShape(5, 3, 7, 7), ComponentShape(35, 1, 1, 21), ComponentShape(35, 1, 1, 21)]
    comps += [
        ComponentShape(7, 1, 5, 21),
        ComponentShape(7, 1, 5, 21),
        ComponentShape(35, 1, 1, 21),
    ]
    base = nn.Linear(in_f, out_f)
    m = _layer(base, comps, gating=gating, scaling=1.7, init=init)
    assert len(m.moka_plans[AD].column_groups) == 2  # the three rank-1 and the two 7x1 / 5x21
    x = torch.randn(3, 4, in_f)
    assert torch.equal(m(x), base(x)), "delta_W must be exactly zero at step 0"
    a_side = [f.weight for f in m.moka_A[AD]]
    b_side = [f.weight for f in m.moka_B[AD]]
    zero, rand = (a_side, b_side) if init == "lora" else (b_side, a_side)
    assert all(torch.count_nonzero(p) == 0 for p in zero)
    assert all(torch.count_nonzero(p) == p.numel() for p in rand)
    _random_factors(m, seed=3)
    ref = base(x).double() + x.double() @ _dense64(m).T
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    # Gradients flow to every factor (and gate) through the grouped path.
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()
               if p.requires_grad)  # fmt: skip


def test_rank_1_components_are_a_lora():
    torch.manual_seed(2)
    base = nn.Linear(24, 40, bias=False)
    m = _layer(base, [ComponentShape(40, 1, 1, 24)] * 3, gating=False, scaling=2.0)
    _random_factors(m, seed=4)
    torch.testing.assert_close(_dense64(m), _lora_like(m), rtol=1e-9, atol=1e-9)
    # LoRA's initialisation: the input-side row random (Kaiming over in), the output side zero.
    with torch.no_grad():
        for f in m.moka_A[AD]:
            f.weight.zero_()
    m.reset_moka_parameters(AD, "lora", identity=False)
    assert all(torch.count_nonzero(_a(m, i)) == 0 for i in range(3))
    bound = 1 / 24**0.5
    assert all(0 < _b(m, i).abs().max() <= bound for i in range(3))
