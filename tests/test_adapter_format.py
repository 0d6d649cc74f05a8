"""Tests for moka_core.adapter_format (format v1): round trips, the math, every validation rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moka_core import adapter_format as af
from moka_core.adapter_format import (
    ComponentShape,
    MokaAdapter,
    MokaConfig,
    MokaModuleWeights,
    TargetSpec,
    adapter_from_tensors,
    is_moka_adapter_dir,
    load_adapter,
    read_adapter_config,
    save_adapter,
    tensors_from_adapter,
)

# Components per variant. q_proj is (out 576, in 576), v_proj is (out 192, in 576) as in
# SmolLM2-135M; includes 1 x n factors. mokas needs m1 == n1.
COMPONENTS = {
    "moka": {
        "q_proj": [[24, 24, 24, 24], [12, 48, 48, 12], [576, 1, 1, 576]],
        "v_proj": [[12, 24, 16, 24], [16, 16, 12, 36], [1, 576, 192, 1]],
    },
    "mokas": {
        "q_proj": [[24, 24, 24, 24], [12, 12, 48, 48], [1, 1, 576, 576]],
        "v_proj": [[12, 12, 16, 48], [4, 4, 48, 144]],
    },
}
DIMS = {"q_proj": (576, 576), "v_proj": (192, 576)}  # target -> (out, in)
MODULES = [f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in ("q_proj", "v_proj")]


def make_config(variant: str = "moka", gating: bool = True, scaling: float = 0.5) -> MokaConfig:
    targets = {
        name: TargetSpec(
            in_features=DIMS[name][1],
            out_features=DIMS[name][0],
            components=tuple(ComponentShape(*c) for c in comps),
        )
        for name, comps in COMPONENTS[variant].items()
    }
    cfg = MokaConfig(
        target_modules=list(targets),
        targets=targets,
        gating=gating,
        scaling=scaling,
        variant=variant,
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    cfg.validate()
    return cfg


def make_adapter(
    variant: str = "moka", gating: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0
) -> MokaAdapter:
    cfg = make_config(variant, gating)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in MODULES:
        comps = cfg.targets[cfg.target_for(path)].components
        modules[path] = MokaModuleWeights(
            A=[
                None if variant == "mokas" else torch.randn(c.m1, c.n1, generator=g).to(dtype)
                for c in comps
            ],
            B=[torch.randn(c.m2, c.n2, generator=g).to(dtype) for c in comps],
            gate=torch.randn(len(comps), generator=g).to(dtype) if gating else None,
        )
    return MokaAdapter(cfg, modules)


def explicit_delta(cfg: MokaConfig, w: MokaModuleWeights, comps) -> torch.Tensor:
    """scaling * sum_i softmax(g)_i kron(A_i, B_i), written out independently of the module."""
    r = len(comps)
    alpha = torch.softmax(w.gate.double(), 0) if cfg.gating else torch.ones(r, dtype=torch.float64)
    total = 0
    for i, c in enumerate(comps):
        a = torch.eye(c.m1, dtype=torch.float64) if w.A[i] is None else w.A[i].double()
        total = total + alpha[i] * torch.kron(a, w.B[i].double())
    return cfg.scaling * total


def assert_adapters_equal(x: MokaAdapter, y: MokaAdapter) -> None:
    assert x.config == y.config
    assert x.modules.keys() == y.modules.keys()
    for path in x.modules:
        wx, wy = x.modules[path], y.modules[path]
        for a, b in zip([*wx.A, *wx.B, wx.gate], [*wy.A, *wy.B, wy.gate], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("variant", ["moka", "mokas"])
def test_round_trip(tmp_path, variant, gating, dtype):
    adapter = make_adapter(variant, gating, dtype)
    save_adapter(adapter, tmp_path / "ad")
    assert is_moka_adapter_dir(tmp_path / "ad")
    loaded = load_adapter(tmp_path / "ad", base_dims=DIMS)
    assert_adapters_equal(adapter, loaded)
    assert read_adapter_config(tmp_path / "ad") == adapter.config
    assert all(k.startswith("base_model.model.") for k in tensors_from_adapter(adapter))


def test_config_json_layout(tmp_path):
    save_adapter(make_adapter(), tmp_path)
    d = json.loads((tmp_path / af.CONFIG_NAME).read_text())
    assert d["peft_type"] == "MOKA" and d["moka_format_version"] == 1
    assert d["targets"]["v_proj"] == {
        "in_features": 576,
        "out_features": 192,
        "components": COMPONENTS["moka"]["v_proj"],
    }
    assert MokaConfig.from_dict(d) == make_config()
    d["task_type"] = "CAUSAL_LM"  # extra PEFT keys are ignored
    assert MokaConfig.from_dict(d) == make_config()


def test_load_accepts_keys_without_prefix(tmp_path):
    adapter = make_adapter()
    save_adapter(adapter, tmp_path)
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in tensors_from_adapter(adapter).items()
    }
    save_file(tensors, str(tmp_path / af.WEIGHTS_NAME))
    assert_adapters_equal(adapter, load_adapter(tmp_path))


def test_load_casts_dtype(tmp_path):
    adapter = make_adapter()
    save_adapter(adapter, tmp_path)
    loaded = load_adapter(tmp_path, dtype=torch.bfloat16)
    w = loaded.modules[MODULES[0]]
    assert all(t.dtype == torch.bfloat16 for t in (*w.A, *w.B, w.gate))


def test_num_parameters():
    for variant in ("moka", "mokas"):
        adapter = make_adapter(variant)
        expected = 0
        for path in MODULES:
            comps = adapter.config.targets[adapter.config.target_for(path)].components
            expected += sum(c.num_params(variant == "mokas") for c in comps) + len(comps)
        assert adapter.num_parameters() == expected


def test_target_for():
    cfg = make_config()
    assert cfg.target_for("model.layers.3.self_attn.q_proj") == "q_proj"
    assert cfg.target_for("model.layers.3.self_attn.k_proj") is None
    assert cfg.target_for("model.layers.3.self_attn.q_proj_x") is None


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("variant", ["moka", "mokas"])
def test_fold_matches_reference(variant, gating):
    adapter = make_adapter(variant, gating)
    folded = adapter.fold(dtype=torch.float64)
    for path, w in adapter.modules.items():
        comps = adapter.config.targets[adapter.config.target_for(path)].components
        ref = adapter.delta_weight(path)
        assert ref.dtype == torch.float64 and ref.shape == DIMS[path.rsplit(".", 1)[-1]]
        torch.testing.assert_close(folded[path].delta_weight(), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(
            explicit_delta(adapter.config, w, comps), ref, rtol=0, atol=1e-12
        )
        if variant == "mokas":
            assert all(a is None for a in folded[path].A)


def test_fold_keeps_dtype_by_default():
    folded = make_adapter(dtype=torch.bfloat16).fold()
    assert all(t.dtype == torch.bfloat16 for t in (*folded[MODULES[0]].A, *folded[MODULES[0]].B))


def test_kron_convention_and_reshape_identity():
    """The identities stated in docs/adapter-format.md (row-major kron)."""
    g = torch.Generator().manual_seed(1)
    m1, n1, m2, n2 = 3, 4, 5, 2
    a = torch.randn(m1, n1, generator=g, dtype=torch.float64)
    b = torch.randn(m2, n2, generator=g, dtype=torch.float64)
    w = torch.kron(a, b)
    assert w[1 * m2 + 3, 2 * n2 + 1] == a[1, 2] * b[3, 1]
    x = torch.randn(n1 * n2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(w @ x, (a @ x.reshape(n1, n2) @ b.T).reshape(-1))


# --------------------------------------------------------------------------- hand-written adapter


def test_hand_written_adapter_loads(tmp_path):
    """Follow docs/adapter-format.md without save_adapter."""
    config = {
        "peft_type": "MOKA",
        "moka_format_version": 1,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "target_modules": ["q_proj", "v_proj"],
        "targets": {
            "q_proj": {
                "in_features": 576,
                "out_features": 576,
                "components": [[24, 24, 24, 24], [12, 48, 48, 12]],
            },
            "v_proj": {
                "in_features": 576,
                "out_features": 192,
                "components": [[12, 24, 16, 24], [16, 16, 12, 36]],
            },
        },
        "gating": True,
        "scaling": 1.0,
        "variant": "moka",
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in range(2):
        for name, spec in config["targets"].items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            for i, (m1, n1, m2, n2) in enumerate(spec["components"]):
                tensors[f"{prefix}.moka_A.{i}.weight"] = torch.randn(m1, n1)
                tensors[f"{prefix}.moka_B.{i}.weight"] = torch.zeros(m2, n2)
            tensors[f"{prefix}.moka_gate"] = torch.zeros(len(spec["components"]))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))

    adapter = load_adapter(tmp_path, base_dims={"q_proj": (576, 576), "v_proj": (192, 576)})
    assert sorted(adapter.modules) == sorted(MODULES)
    assert torch.count_nonzero(adapter.delta_weight("model.layers.1.self_attn.v_proj")) == 0


# --------------------------------------------------------------------------- config validation


def write_adapter(path: Path, adapter: MokaAdapter | None = None, config: dict | None = None):
    """Write a valid adapter, optionally replacing its config JSON with ``config``."""
    save_adapter(adapter or make_adapter(), path)
    if config is not None:
        (path / af.CONFIG_NAME).write_text(json.dumps(config))


def expect_error(path: Path, match: str, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as exc:
        load_adapter(path, **kwargs)
    assert str(path) in str(exc.value)


def _set(*keys, value=None, delete=False):
    """Mutator that sets (or deletes) d[k0][k1]... in a config dict."""

    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        if delete:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value

    return mutate


CONFIG_CASES = [
    (_set("peft_type", value="LORA"), "peft_type is 'LORA', expected 'MOKA'"),
    (_set("peft_type", delete=True), "peft_type is missing"),
    (_set("moka_format_version", delete=True), "moka_format_version is missing"),
    (_set("moka_format_version", value=2), "unsupported moka_format_version 2"),
    (_set("moka_format_version", value="1"), "unsupported moka_format_version '1'"),
    (_set("target_modules", value="q_proj"), "target_modules must be a non-empty list"),
    (_set("target_modules", value=[]), "target_modules must be a non-empty list"),
    (_set("target_modules", value=["q_proj", 3]), "target_modules must be a non-empty list"),
    (_set("target_modules", value=["q_proj"]), "targets keys .* differ from target_modules"),
    (_set("targets", "k_proj", value={}), "lacks 'in_features'"),
    (_set("targets", "v_proj", delete=True), "targets keys .* differ from target_modules"),
    (_set("targets", "q_proj", "in_features", delete=True), "'q_proj' lacks 'in_features'"),
    (_set("targets", "q_proj", "out_features", delete=True), "'q_proj' lacks 'out_features'"),
    (_set("targets", "q_proj", "components", delete=True), "'q_proj' lacks 'components'"),
    (_set("targets", "q_proj", "in_features", value=0), "must be positive integers"),
    (_set("targets", "q_proj", "components", value=[]), "'q_proj': components is empty"),
    (_set("targets", "q_proj", "components", 1, value=[24, 24, 24]), "not 4 positive integers"),
    (_set("targets", "q_proj", "components", 1, value=[0, 24, 24, 24]), "not 4 positive"),
    (_set("targets", "q_proj", "components", 1, value=[24, 24, 24, "24"]), "not 4 positive"),
    (_set("targets", "q_proj", "components", 1, value=[24.0, 24, 24, 24]), "not 4 positive"),
    (
        _set("targets", "q_proj", "components", 1, value=[24, 24, 12, 24]),
        r"'q_proj' component 1 .*m1\*m2 = 24\*12 = 288 != out_features 576",
    ),
    (
        _set("targets", "v_proj", "components", 0, value=[12, 24, 16, 12]),
        r"'v_proj' component 0 .*n1\*n2 = 24\*12 = 288 != in_features 576",
    ),
    (_set("variant", value="lora"), "variant is 'lora', expected one of"),
    (_set("variant", value="mokas"), "variant mokas needs a square identity A"),
    (_set("gating", value="yes"), "gating must be true or false"),
    (_set("gating", value=1), "gating must be true or false"),
    (_set("scaling", value="1.0"), "scaling must be a finite number"),
    (_set("scaling", value=math.nan), "scaling must be a finite number"),
    (_set("scaling", value=math.inf), "scaling must be a finite number"),
    (_set("scaling", value=True), "scaling must be a finite number"),
]


@pytest.mark.parametrize("mutate, match", CONFIG_CASES)
def test_config_rule(tmp_path, mutate, match):
    d = make_config().to_dict()
    mutate(d)
    write_adapter(tmp_path, config=d)
    expect_error(tmp_path, match)
    with pytest.raises(ValueError, match=match):
        read_adapter_config(tmp_path)


def test_missing_config(tmp_path):
    write_adapter(tmp_path)
    (tmp_path / af.CONFIG_NAME).unlink()
    expect_error(tmp_path, "missing adapter_config.json")
    assert not is_moka_adapter_dir(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_invalid_json(tmp_path, text):
    write_adapter(tmp_path)
    (tmp_path / af.CONFIG_NAME).write_text(text, encoding="latin-1")
    expect_error(tmp_path, "not valid JSON")
    assert not is_moka_adapter_dir(tmp_path)


def test_config_not_an_object(tmp_path):
    write_adapter(tmp_path, config=[1, 2])
    expect_error(tmp_path, "must be a JSON object")


def test_is_moka_adapter_dir_never_raises(tmp_path):
    assert not is_moka_adapter_dir(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    assert not is_moka_adapter_dir(tmp_path / "f")
    (tmp_path / af.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    assert not is_moka_adapter_dir(tmp_path)


def test_base_dims_mismatch(tmp_path):
    write_adapter(tmp_path)
    dims = {"q_proj": (576, 576), "v_proj": (576, 576)}
    expect_error(tmp_path, r"'v_proj': adapter dims \(out=192, in=576\) differ", base_dims=dims)


def test_base_dims_missing_target(tmp_path):
    write_adapter(tmp_path)
    expect_error(
        tmp_path, "'v_proj' is not a layer of the base model", base_dims={"q_proj": (576, 576)}
    )


def test_bad_load_dtype(tmp_path):
    write_adapter(tmp_path)
    expect_error(tmp_path, "cannot load as torch.float64", dtype=torch.float64)


def test_cast_overflow(tmp_path):
    adapter = make_adapter()
    adapter.modules[MODULES[0]].B[0][0, 0] = 1e10
    write_adapter(tmp_path, adapter)
    expect_error(tmp_path, "overflow when cast to torch.float16", dtype=torch.float16)


# --------------------------------------------------------------------------- weight validation


def weights_path(path: Path) -> Path:
    return path / af.WEIGHTS_NAME


def write_tensors(path: Path, mutate, variant: str = "moka", gating: bool = True) -> None:
    """Write a valid adapter, then rewrite its safetensors after ``mutate(tensors)``."""
    adapter = make_adapter(variant, gating)
    write_adapter(path, adapter)
    tensors = dict(tensors_from_adapter(adapter))
    mutate(tensors)
    save_file(tensors, str(weights_path(path)))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_missing_weights(tmp_path):
    write_adapter(tmp_path)
    weights_path(tmp_path).unlink()
    expect_error(tmp_path, "missing adapter_model.safetensors")


def test_file_too_large(tmp_path, monkeypatch):
    write_adapter(tmp_path)
    monkeypatch.setattr(af, "MAX_ADAPTER_BYTES", 1000)
    expect_error(tmp_path, "over the 1000 limit")


@pytest.mark.parametrize(
    "cut, match",
    [
        (10, "header describes .*truncated"),  # data cut short
        ("half", "header describes|does not fit"),
        ("header", "does not fit|not valid JSON"),  # cut inside the header
        ("tiny", "truncated or not safetensors"),  # fewer than 8 bytes
    ],
)
def test_truncated_weights(tmp_path, cut, match):
    write_adapter(tmp_path)
    data = weights_path(tmp_path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    keep = {"half": len(data) // 2, "header": 8 + n // 2, "tiny": 5}.get(cut, len(data) - 10)
    weights_path(tmp_path).write_bytes(data[:keep])
    expect_error(tmp_path, match)


def test_trailing_bytes(tmp_path):
    write_adapter(tmp_path)
    with open(weights_path(tmp_path), "ab") as f:
        f.write(b"\0" * 16)
    expect_error(tmp_path, "header describes")


@pytest.mark.parametrize(
    "data, match",
    [
        (b"this is not a safetensors file at all, just text", "does not fit"),
        ((17).to_bytes(8, "little") + b"\x00garbage\xffgarbage\x00", "header is not valid JSON"),
        ((4).to_bytes(8, "little") + b"[12]", "header is not a JSON object"),
        (b"", "truncated or not safetensors"),
    ],
)
def test_garbage_weights(tmp_path, data, match):
    write_adapter(tmp_path)
    weights_path(tmp_path).write_bytes(data)
    expect_error(tmp_path, match)


def _rewrite_header(path: Path, edit) -> None:
    data = weights_path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    weights_path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def test_corrupt_offsets(tmp_path):
    write_adapter(tmp_path)

    def edit(h):
        h[f"{Q0}.moka_A.0.weight"]["data_offsets"][1] += 4

    _rewrite_header(tmp_path, edit)
    expect_error(tmp_path, "data_offsets .* do not match")


def test_malformed_header_entry(tmp_path):
    write_adapter(tmp_path)
    _rewrite_header(tmp_path, lambda h: h[f"{Q0}.moka_A.0.weight"].pop("shape"))
    expect_error(tmp_path, "header entry .* is malformed")


def test_read_error_is_wrapped(tmp_path, monkeypatch):
    """An OS error while the weights are read (e.g. EIO) is a ValueError with the reason."""
    write_adapter(tmp_path)

    def boom(*args, **kwargs):
        raise OSError(5, "simulated input/output error")

    monkeypatch.setattr(af, "_read_tensors", boom)
    expect_error(tmp_path, "cannot read adapter_model.safetensors.*simulated")


def test_tensors_are_read_exactly(tmp_path):
    """The one-buffer reader gives what safetensors itself reads, every dtype."""
    from safetensors.torch import load_file

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        folder = tmp_path / str(dtype)
        write_adapter(folder, make_adapter(dtype=dtype))
        want = load_file(str(folder / af.WEIGHTS_NAME))
        layout, got, values = af._read_tensors(folder / af.WEIGHTS_NAME)
        shapes = {k: tuple(v.shape) for k, v in want.items()}
        assert set(got) == set(want) and layout.shapes == shapes
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        # every value once, in the one view the finiteness check reads
        every = torch.cat([t.reshape(-1) for t in want.values()])
        assert values.dtype == dtype and torch.equal(values.sort().values, every.sort().values)


def _add(key, shape=(2, 2)):
    return lambda t: t.__setitem__(key, torch.zeros(shape))


def _drop(key):
    return lambda t: t.pop(key)


def _replace(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


WEIGHT_CASES = [
    (_add(f"{Q0}.lora_A.weight"), "unknown tensor .*lora_A.weight.*expected"),
    (_add("base_model.model.model.layers.0.mlp.up_proj.moka_B.0.weight"), "does not end in one of"),
    (_add(f"{Q0}.moka_B.7.weight"), "'q_proj' has only 3 components"),
    (_add(f"{Q0}.moka_B.01.weight"), "unknown tensor"),
    (
        _drop(f"{Q0}.moka_B.1.weight"),
        r"'model.layers.0.self_attn.q_proj' is missing tensors \['B.1'\]",
    ),
    (_drop(f"{Q0}.moka_A.2.weight"), r"is missing tensors \['A.2'\]"),
    (
        _replace(f"{Q0}.moka_A.0.weight", lambda x: torch.zeros(24, 25)),
        r"has shape \[24, 25\], expected \[24, 24\]",
    ),
    (
        _replace(f"{Q0}.moka_gate", lambda x: torch.zeros(2)),
        r"moka_gate' has shape \[2\], expected \[3\]",
    ),
    (_replace(f"{Q0}.moka_A.0.weight", lambda x: x.to(torch.float64)), "dtype F64"),
    (_replace(f"{Q0}.moka_A.0.weight", lambda x: x.to(torch.int32)), "dtype I32"),
    (_replace(f"{Q0}.moka_A.0.weight", lambda x: x.clone().fill_(math.nan)), "non-finite"),
    (_replace(f"{Q0}.moka_B.1.weight", lambda x: x.clone().fill_(math.inf)), "non-finite"),
    (_drop(f"{Q0}.moka_gate"), "gating is true but its moka_gate is missing"),
    (lambda t: t.clear(), "no modules"),
    (
        lambda t: t.__setitem__(
            Q0.removeprefix("base_model.model.") + ".moka_gate", t[f"{Q0}.moka_gate"].clone()
        ),
        "duplicates",
    ),
]


@pytest.mark.parametrize("mutate, match", WEIGHT_CASES)
def test_weight_rule(tmp_path, mutate, match):
    write_tensors(tmp_path, mutate)
    expect_error(tmp_path, match)


def test_gate_present_when_gating_off(tmp_path):
    write_tensors(tmp_path, _add(f"{Q0}.moka_gate", (3,)), gating=False)
    expect_error(tmp_path, "gate tensor is present but gating is false")


def test_mokas_rejects_a_tensors(tmp_path):
    write_tensors(tmp_path, _add(f"{Q0}.moka_A.0.weight", (24, 24)), variant="mokas")
    expect_error(tmp_path, "variant mokas stores no A tensors")


# --------------------------------------------------------------------------- in-memory validation


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda t: t.to(torch.float64), "dtype torch.float64"),
        (lambda t: t.to(torch.int64), "dtype torch.int64"),
        (lambda t: torch.full_like(t, math.nan), "non-finite"),
        (lambda t: t.numpy(), "not a torch.Tensor"),
    ],
)
def test_in_memory_rules(fn, match):
    adapter = make_adapter()
    tensors = tensors_from_adapter(adapter)
    key = f"{Q0}.moka_B.0.weight"
    tensors[key] = fn(tensors[key])
    with pytest.raises(ValueError, match=match):
        adapter_from_tensors(adapter.config, tensors)


def test_save_refuses_invalid_adapter(tmp_path):
    adapter = make_adapter()
    adapter.modules[MODULES[0]].gate = None
    with pytest.raises(ValueError, match="refusing to save.*moka_gate is missing"):
        save_adapter(adapter, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def test_validate_catches_a_in_mokas():
    adapter = make_adapter("mokas")
    adapter.modules[MODULES[0]].A[0] = torch.eye(24)
    with pytest.raises(ValueError, match="variant mokas stores no A tensors"):
        adapter.validate()


def test_delta_weight_unknown_module():
    with pytest.raises(ValueError, match="not in this adapter"):
        make_adapter().delta_weight("model.layers.9.self_attn.q_proj")


# --------------------------------------------------------------------------- format -> kernels


@pytest.mark.parametrize("variant", ["moka", "mokas"])
def test_loaded_adapter_through_kernel_bank_equals_merged_delta(tmp_path, variant):
    """save -> load -> fold -> MokaBank -> moka_apply_torch equals delta_W @ x (float64)."""
    from moka_kernels import MokaBank, moka_apply_torch

    save_adapter(make_adapter(variant, gating=True), tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", base_dims=DIMS)
    folded = loaded.fold(dtype=torch.float64)
    for path in MODULES:
        target = loaded.config.target_for(path)
        out_f, in_f = DIMS[target]
        shapes = loaded.config.targets[target].components
        # one cap for A and B, as the server's banks have: a (1, n) (x) (m, 1) term is stored
        # as the outer product's column and row, its factors' roles swapped
        cap = max(max(c.m1 * c.n1, c.m2 * c.n2) for c in shapes)
        bank = MokaBank(2, len(shapes), cap, cap, in_f, out_f, torch.float64)
        bank.write_slot(1, folded[path].kron_entries())
        x = torch.randn(4, in_f, dtype=torch.float64)
        y = torch.zeros(4, out_f, dtype=torch.float64)
        moka_apply_torch(x, y, torch.tensor([1, -1, 1, 0]), bank)
        want = x @ loaded.delta_weight(path).T
        assert torch.allclose(y[[0, 2]], want[[0, 2]], atol=1e-10)
        assert torch.equal(y[[1, 3]], torch.zeros(2, out_f, dtype=torch.float64))


def _adapter_with(components: dict[str, list[list[int]]], variant: str, gating: bool, seed: int):
    targets = {
        name: TargetSpec(DIMS[name][1], DIMS[name][0], tuple(ComponentShape(*c) for c in comps))
        for name, comps in components.items()
    }
    cfg = MokaConfig(
        target_modules=list(targets), targets=targets, gating=gating, scaling=0.7,
        variant=variant, base_model_name_or_path="x",
    )  # fmt: skip
    cfg.validate()
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(3):
        for name, comps in cfg.targets.items():
            modules[f"model.layers.{layer}.self_attn.{name}"] = MokaModuleWeights(
                A=[
                    None if cfg.identity_a else torch.randn(c.m1, c.n1, generator=g)
                    for c in comps.components
                ],  # fmt: skip
                B=[torch.randn(c.m2, c.n2, generator=g) for c in comps.components],
                gate=torch.randn(len(comps.components), generator=g) if gating else None,
            )
    return MokaAdapter(cfg, modules)


GROUPED_CASES = {
    # moka-train's mixed family: one balanced term plus 1, 3 and 7 rank-1 terms
    **{
        f"mixed-{k}": {
            "q_proj": [[24, 24, 24, 24]] + [[576, 1, 1, 576]] * k,
            "v_proj": [[12, 24, 16, 24]] + [[192, 1, 1, 576]] * k,
        }
        for k in (1, 3, 7)
    },
    # rank-1 terms both ways round ((1, n) (x) (m, 1) joins as (b, a)), first and last
    "both-ways": {
        "q_proj": [[576, 1, 1, 576], [24, 24, 24, 24], [1, 576, 576, 1]],
        "v_proj": [[1, 576, 192, 1], [12, 48, 16, 12], [192, 1, 1, 576]],
    },
    "kron": COMPONENTS["moka"] | {"q_proj": [[24, 24, 24, 24], [12, 48, 48, 12]]},
    "mokas": COMPONENTS["mokas"],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("case", sorted(GROUPED_CASES))
def test_grouped_kron_entries_equal_module_by_module(case, gating, dtype):
    """The server's stacked path (FoldedGroup.kron_entries) against each module's own
    FoldedModule.kron_entries cast after grouping: same entries, order, ranks and bits."""
    import dataclasses

    variant = "mokas" if case == "mokas" else "moka"
    adapter = _adapter_with(GROUPED_CASES[case], variant, gating, seed=len(case))
    folded = adapter.fold(dtype=torch.float64)  # grouped module by module, then cast
    slices = {p: i % 3 for i, p in enumerate(adapter.modules)}
    groups = adapter.fold_groups(dtype=torch.float64)
    assert sorted(p for g in groups for p in g.paths) == sorted(adapter.modules)
    for group in groups:
        got = group.kron_entries(dtype, slices)
        for path in group.paths:
            want = [
                dataclasses.replace(
                    e, a=None if e.a is None else e.a.to(dtype), b=e.b.to(dtype)
                )
                for e in folded[path].kron_entries(slice=slices[path])
            ]  # fmt: skip
            assert len(got[path]) == len(want)
            for g_, w in zip(got[path], want, strict=True):
                assert (g_.rank, g_.slice, g_.identity_size) == (w.rank, w.slice, w.identity_size)
                assert (g_.a is None) == (w.a is None)
                assert g_.b.dtype == dtype and torch.equal(g_.b, w.b)
                assert g_.a is None or torch.equal(g_.a, w.a)
        grouped = case in ("mixed-3", "mixed-7", "both-ways")  # more than one rank-1 term
        assert any(e.rank > 1 for es in got.values() for e in es) == grouped


@pytest.mark.parametrize("case", ["mixed-3", "mokas"])
def test_fold_groups_match_the_reference_and_bound_each_update(case):
    variant = "mokas" if case == "mokas" else "moka"
    adapter = _adapter_with(GROUPED_CASES[case], variant, True, seed=5)
    for group in adapter.fold_groups(dtype=torch.float64):
        bounds = group.update_bounds().tolist()
        for path, module, bound in zip(group.paths, group.modules().values(), bounds, strict=True):
            ref = adapter.delta_weight(path)
            torch.testing.assert_close(module.delta_weight(), ref, rtol=0, atol=1e-12)
            want = sum(
                (1.0 if a is None else float(torch.linalg.vector_norm(a)))
                * float(torch.linalg.vector_norm(b))
                for a, b in zip(module.A, module.B, strict=True)
            )
            assert bound == pytest.approx(want, rel=1e-12)
            assert bound >= float(torch.linalg.matrix_norm(ref, ord=2))


def test_grouped_kron_entries_name_the_module_that_overflows():
    adapter = _adapter_with(GROUPED_CASES["mixed-3"], "moka", True, seed=2)
    bad = "model.layers.1.self_attn.q_proj"
    adapter.modules[bad].B[2] = adapter.modules[bad].B[2] * 1e6  # a rank-1 term: in U/V
    groups = {g.paths[0].rsplit(".", 1)[-1]: g for g in adapter.fold_groups(torch.float64)}
    groups["v_proj"].kron_entries(torch.float16)  # untouched target: fits
    with pytest.raises(ValueError, match=rf"module '{bad}': folded factors overflow"):
        groups["q_proj"].kron_entries(torch.float16)
    groups["q_proj"].kron_entries(torch.float32)


def test_a_header_seen_before_still_checks_everything_else(tmp_path):
    """Files whose header bytes were checked before (``_LAYOUTS``: every adapter of one config
    shares them) skip parsing it again, and nothing else: their own values, size, config and
    finiteness are still read and checked."""
    first, second = tmp_path / "first", tmp_path / "second"
    write_adapter(first, make_adapter(seed=1))
    load_adapter(first)
    header = weights_path(first).read_bytes()
    header = header[8 : 8 + int.from_bytes(header[:8], "little")]
    assert header in af._LAYOUTS  # the next loads take the cached layout

    other = make_adapter(seed=2)
    write_adapter(second, other)
    assert_adapters_equal(load_adapter(second), other)  # this file's values, not the first's

    data = weights_path(second).read_bytes()
    weights_path(second).write_bytes(data[:-4])
    expect_error(second, "header describes .*truncated")
    weights_path(second).write_bytes(data + b"\0" * 4)
    expect_error(second, "header describes")

    weights_path(second).write_bytes(data)
    cfg = json.loads((second / af.CONFIG_NAME).read_text())
    cfg["gating"] = False  # the same tensors under another config: indexed against this one
    (second / af.CONFIG_NAME).write_text(json.dumps(cfg))
    expect_error(second, "gating is false")

    write_adapter(second, other)
    tensors = {k: t.clone() for k, t in tensors_from_adapter(make_adapter(seed=3)).items()}
    tensors[f"base_model.model.{MODULES[0]}.moka_B.0.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights_path(second)), metadata={"format": "pt"})
    assert weights_path(second).read_bytes()[8 : 8 + len(header)] == header
    expect_error(second, "non-finite")
