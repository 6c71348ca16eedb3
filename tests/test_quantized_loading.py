"""Loading LightX2V FP8/INT8 and ComfyUI scaled-fp8 files (fixtures built here from
spec/quant-formats.md) and running them as W8A8 against a float64 W8A8 emulation."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import dit8
from dit8 import CheckpointError
from dit8.cli import main
from dit8.layouts import block_linears
from dit8.layers import QuantLinear
from dit8.testing import random_inputs, random_weights, tiny_config, write_checkpoint
from reference_wan import reference_forward

QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def quantize_per_channel(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V's weight quantization: symmetric per output channel, scale = max(amax, 1e-5)/qmax."""
    w = w.float()
    qmax = 127.0 if scheme == "int8" else 448.0
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-5) / qmax
    y = w / scale
    q = y.round().clamp(-128, 127).to(torch.int8) if scheme == "int8" else y.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def lightx2v_weights(weights, config, scheme, *, scale_dtype=torch.float32, flat_scale=False):
    """The 12 (I2V) block linears 8-bit with `.weight_scale`, everything else bf16."""
    out = {}
    quantized = {f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)}
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantized:
            q, scale = quantize_per_channel(value, scheme)
            out[key] = q
            out[module + ".weight_scale"] = (scale.flatten() if flat_scale else scale).to(scale_dtype)
        else:
            out[key] = value.to(torch.bfloat16)
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CONFIG = tiny_config("i2v")


@pytest.fixture(scope="module")
def base():
    weights = random_weights(CONFIG, seed=21)
    inputs = random_inputs(CONFIG, seed=22)
    return weights, inputs


@pytest.mark.parametrize("per_block", [False, True], ids=["whole", "per_block"])
@pytest.mark.parametrize("scale_dtype, flat", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-scale[out,1]", "bf16-scale[out]"])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_lightx2v_files_run_as_w8a8(tmp_path, base, scheme, scale_dtype, flat, per_block):
    weights, inputs = base
    stored = lightx2v_weights(weights, CONFIG, scheme, scale_dtype=scale_dtype, flat_scale=flat)
    path = write_checkpoint(stored, tmp_path / ("q" if per_block else "q.safetensors"),
                            fmt="per_block" if per_block else "safetensors")
    model = dit8.load_dit(path)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 12 * CONFIG.num_layers
    assert all(m.weight.dtype == QDTYPE[scheme] for m in layers)
    assert dit8.open_dit(path).format == "lightx2v"

    hp = {k: v for k, v in stored.items() if ".weight_scale" not in k and v.dtype == torch.bfloat16}
    dequantized = {k: (v.float() * stored[k.removesuffix(".weight") + ".weight_scale"].float().reshape(-1, 1)
                       if v.dtype in QDTYPE.values() else v) for k, v in stored.items() if "weight_scale" not in k}
    assert len(hp) + len(layers) == len(dequantized)
    ref = reference_forward(dequantized, **inputs, num_heads=CONFIG.num_heads)  # 8-bit weights, exact math
    emulated = reference_forward(stored, **inputs, num_heads=CONFIG.num_heads)  # + per-token activation quant
    emulation_err = rel_err(emulated, ref)
    err = rel_err(model(**inputs), ref)
    assert 0 < err <= 2 * emulation_err, (err, emulation_err)


def comfyui_weights(weights, config):
    """ComfyUI scaled fp8: prefixed keys, one `.scale_weight` per tensor, a `scaled_fp8` marker; one
    non-block linear (text_embedding.2) is fp8 too, which the runtime dequantizes on load."""
    modules = {f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)}
    modules.add("text_embedding.2")
    out, reference = {}, {}
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in modules:
            scale = value.abs().amax().clamp_min(1e-5) / 448
            q = (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out["model.diffusion_model." + key] = q
            out[f"model.diffusion_model.{module}.scale_weight"] = scale.reshape(1)
            if module.startswith("blocks."):
                reference[key], reference[module + ".weight_scale"] = q, scale.expand(value.shape[0], 1)
            else:
                reference[key] = q.float() * scale
        else:
            out["model.diffusion_model." + key] = reference[key] = value
    out["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out, reference


def test_comfyui_scaled_fp8_file(tmp_path, base):
    weights, inputs = base
    stored, reference = comfyui_weights(weights, CONFIG)
    path = tmp_path / "wan_comfyui.safetensors"
    save_file(stored, str(path))
    dit = dit8.open_dit(path)
    assert (dit.layout, dit.format, len(dit.quantized)) == ("comfyui", "comfyui scaled-fp8", 12 * 2 + 1)
    model = dit8.load_dit(path)
    assert model.text_embedding[2].weight.dtype == torch.float32  # dequantized on load
    torch.testing.assert_close(model.text_embedding[2].weight, reference["text_embedding.2.weight"].float())
    emulated = reference_forward(reference, **inputs, num_heads=CONFIG.num_heads)
    exact = reference_forward({k: v for k, v in reference.items() if "weight_scale" not in k} | {
        k: v.float() * reference[k.removesuffix(".weight") + ".weight_scale"] for k, v in reference.items()
        if v.dtype == torch.float8_e4m3fn}, **inputs, num_heads=CONFIG.num_heads)
    assert 0 < rel_err(model(**inputs), exact) <= 2 * rel_err(emulated, exact)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_the_loading_bar_ends_at_its_total(tmp_path, base, monkeypatch, scheme):
    """The bar's total counts the scales' bytes, so reading them with their weights must count them too:
    an 8-bit file's bar ended short of 100%."""
    import dit8.loader
    from dit8.progress import Progress

    bars = []

    class Recorded(Progress):
        def close(self) -> None:
            bars.append((self.done, self.total))
            super().close()

    monkeypatch.setattr(dit8.loader, "Progress", Recorded)
    path = tmp_path / "q.safetensors"
    save_file(lightx2v_weights(base[0], CONFIG, scheme), str(path))
    dit8.load_dit(path, progress=True)
    [(done, total)] = bars
    dit = dit8.open_dit(path)
    assert done == total == sum(dit.checkpoint.infos[k].nbytes for k in dit.names.values())


def test_an_fp8_cast_without_scales_runs_as_fp8_with_unit_scales(tmp_path, base):
    """An fp8 file without scales (ComfyUI's fp8_e4m3fn files: a plain cast) loads as W8A8 FP8 with a scale of
    1: the forward of a LightX2V file of the same codes and unit scales, bit for bit. Its other fp8 tensors (a
    non-block linear, a bias) are read as the floats they hold."""
    weights, inputs = base
    modules = {f"blocks.{n}.{name}" for n in range(CONFIG.num_layers) for name in block_linears(CONFIG)}
    cast = {k: v.to(torch.float8_e4m3fn) if k.removesuffix(".weight") in modules or k in (
        "text_embedding.2.weight", "blocks.0.self_attn.q.bias") else v for k, v in weights.items()}
    path = tmp_path / "wan_fp8_e4m3fn.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in cast.items()}, str(path))
    dit = dit8.open_dit(path)
    # The layers that run as FP8 (what `dit8 info` counts): the block linears.
    assert (dit.layout, dit.format, set(dit.quantized)) == ("comfyui", "unscaled fp8", modules)
    unit = {k: v.float() if v.dtype == torch.float8_e4m3fn and k.removesuffix(".weight") not in modules else v
            for k, v in cast.items()}
    unit |= {module + ".weight_scale": torch.ones(CONFIG.dim if "ffn.0" not in module else CONFIG.ffn_dim, 1)
             for module in modules}
    model, same = dit8.load_dit(path), dit8.load_dit(write_checkpoint(unit, tmp_path / "unit.safetensors"))
    assert dit8.open_dit(tmp_path / "unit.safetensors").format == "lightx2v"
    assert sum(isinstance(m, QuantLinear) and m.weight.dtype == torch.float8_e4m3fn for m in model.modules()) == 24
    torch.testing.assert_close(model.text_embedding[2].weight, cast["text_embedding.2.weight"].float(),
                               rtol=0, atol=0)
    assert torch.equal(model(**inputs), same(**inputs))


def test_fp8_e5m2_weights_without_scales_are_read_as_floats(tmp_path, base):
    """e5m2 has no FP8 GEMM here: its weights are upcast on load and run as float linears."""
    weights, inputs = base
    stored = {k: v.to(torch.float8_e5m2) if k.startswith("blocks.") and v.ndim == 2 else v for k, v in weights.items()}
    model = dit8.load_dit(write_checkpoint(stored, tmp_path / "e5m2.safetensors"))
    assert dit8.open_dit(tmp_path / "e5m2.safetensors").format == "float"
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(model.blocks[1].ffn[0].weight, stored["blocks.1.ffn.0.weight"].float())


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_8bit_weights_without_any_scale_but_not_a_plain_fp8_cast(tmp_path, base, dtype):
    """int8 codes mean nothing without their scale; fp8 ones beside another tensor's scale are a file missing
    one: both are refused, naming the tensor."""
    stored = lightx2v_weights(base[0], CONFIG, "int8" if dtype == torch.int8 else "fp8")
    if dtype == torch.int8:
        stored = {k: v for k, v in stored.items() if not k.endswith(".weight_scale")}
    else:
        del stored["blocks.1.ffn.2.weight_scale"]
    msg = error_of(stored, tmp_path / "q.safetensors")
    assert re.search(r"8-bit tensor 'blocks\.\d\.\S+\.weight' has no scale", msg), msg
    if dtype != torch.int8:
        assert "'blocks.1.ffn.2.weight'" in msg


@pytest.fixture
def int8_file(tmp_path, base):
    return lightx2v_weights(base[0], CONFIG, "int8"), tmp_path / "q.safetensors"


def error_of(stored, path) -> str:
    save_file(stored, str(path))
    with pytest.raises(CheckpointError) as info:
        dit8.load_dit(path)
    return str(info.value)


def test_8bit_weight_without_scale(int8_file):
    stored, path = int8_file
    del stored["blocks.1.ffn.0.weight_scale"]
    msg = error_of(stored, path)
    assert "blocks.1.ffn.0.weight" in msg and "no scale" in msg


def test_scale_without_8bit_weight(int8_file):
    stored, path = int8_file
    stored["head.head.weight_scale"] = torch.ones(64, 1)
    assert "head.head.weight_scale" in error_of(stored, path)


def test_a_weight_with_both_kinds_of_scale(int8_file):
    """A per-channel and a per-tensor scale for one weight: which one is meant is a guess, so it is refused
    naming the module and both suffixes (not reported as an unexpected tensor, or one of them taken)."""
    stored, path = int8_file
    stored["blocks.0.self_attn.q.scale_weight"] = torch.ones(())
    assert error_of(stored, path) == f"{path}: 'blocks.0.self_attn.q' has both .weight_scale and .scale_weight"


def test_misshaped_scale(int8_file):
    stored, path = int8_file
    stored["blocks.0.self_attn.q.weight_scale"] = torch.ones(3, 1)
    assert "blocks.0.self_attn.q.weight_scale" in error_of(stored, path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32])
def test_scale_of_a_dtype_that_is_no_scale(int8_file, dtype):
    """A scale stored as 8-bit codes or integers is named with its dtype (an 8-bit one was reported as a weight
    missing its own scale)."""
    stored, path = int8_file
    stored["blocks.0.self_attn.q.weight_scale"] = stored["blocks.0.self_attn.q.weight_scale"].to(dtype)
    msg = error_of(stored, path)
    assert f"scale 'blocks.0.self_attn.q.weight_scale' has dtype {dtype}, expected a float" in msg, msg


def test_non_positive_scale(int8_file):
    stored, path = int8_file
    stored["blocks.0.self_attn.q.weight_scale"][5] = 0
    assert "blocks.0.self_attn.q.weight_scale" in error_of(stored, path)


def test_a_dequantized_product_that_overflows(int8_file):
    """An 8-bit layer the model runs in high precision (outside the blocks) is dequantized on loading: a
    finite scale whose products with the codes overflow fp32 is refused, as is a float64 scale beyond fp32."""
    from dit8.converters.quantize_weights import quantize_weight

    stored, path = int8_file
    codes, scale = quantize_weight(stored["text_embedding.0.weight"].float(), "int8")
    stored["text_embedding.0.weight"], stored["text_embedding.0.weight_scale"] = codes, torch.full_like(scale, 3e37)
    assert error_of(stored, path) == (f"{path}: tensor 'text_embedding.0.weight' times its scale overflows float32 "
                                      f"(magnitudes above 3.403e+38)")
    stored["text_embedding.0.weight_scale"] = torch.full(stored["text_embedding.0.weight_scale"].shape, 1e300,
                                                         dtype=torch.float64)
    assert error_of(stored, path) == (f"{path}: scale 'text_embedding.0.weight_scale' overflows float32 "
                                      f"(magnitudes above 3.403e+38)")


def test_nan_in_fp8_weight(tmp_path, base):
    stored = lightx2v_weights(base[0], CONFIG, "fp8")
    stored["blocks.0.ffn.2.weight"].view(torch.uint8)[0, 0] = 0x7F
    msg = error_of(stored, tmp_path / "q.safetensors")
    assert "blocks.0.ffn.2.weight" in msg and "NaN" in msg


def test_unknown_packed_format_version(int8_file):
    stored, path = int8_file
    save_file(stored, str(path), metadata={"dit8.format": "dit8.packed", "dit8.format_version": "99"})
    with pytest.raises(CheckpointError, match="version 99"):
        dit8.load_dit(path)


def test_info_reports_the_quantization(int8_file, capsys):
    stored, path = int8_file
    save_file(stored, str(path))
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "lightx2v" and summary["quantized_layers"] == {"fp8": 0, "int8": 24}


@pytest.mark.parametrize("per_block", [False, True], ids=["whole", "per_block"])
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_converted_model_against_float64(tmp_path, base, scheme, per_block):
    """dit8 convert -> load_dit -> forward stays within 2x the error of a float64 W8A8 emulation of the
    converted file, both measured against the float64 forward of the source weights."""
    from safetensors.torch import load_file

    from dit8.converters import convert

    weights, inputs = base
    src = write_checkpoint(weights, tmp_path / "src.safetensors", config=CONFIG)
    result = convert(src, tmp_path / ("out" if per_block else "out.safetensors"), scheme=scheme,
                     per_block=per_block, report=False)
    stored = {}
    for file in result.files:
        stored.update(load_file(str(file)))
    ref = reference_forward(weights, **inputs, num_heads=CONFIG.num_heads)
    emulated = reference_forward(stored, **inputs, num_heads=CONFIG.num_heads)
    model = dit8.load_dit(result.output)
    assert dit8.open_dit(result.output).format == "dit8 packed"
    err, emulation_err = rel_err(model(**inputs), ref), rel_err(emulated, ref)
    assert 0 < err <= 2 * emulation_err, (err, emulation_err)


def test_an_fp8_cast_of_every_tensor_reads_its_norms_and_biases_as_floats(tmp_path, base):
    """A cast of every tensor to e4m3 (norm weights, biases, modulation, patch embedding too): the block
    linears run as FP8 with a scale of 1, every other tensor is read as the floats it holds, whatever
    its rank: the forward of a LightX2V file of the same values and unit scales, bit for bit."""
    weights, inputs = base
    modules = {f"blocks.{n}.{name}" for n in range(CONFIG.num_layers) for name in block_linears(CONFIG)}
    cast = {k: v.to(torch.float8_e4m3fn) for k, v in weights.items()}
    model = dit8.load_dit(write_checkpoint(cast, tmp_path / "cast.safetensors", layout="comfyui"))
    unit = {k: v if k.removesuffix(".weight") in modules else v.float() for k, v in cast.items()}
    unit |= {module + ".weight_scale": torch.ones(cast[module + ".weight"].shape[0], 1) for module in modules}
    same = dit8.load_dit(write_checkpoint(unit, tmp_path / "unit.safetensors"))
    assert torch.equal(model.blocks[0].norm3.weight, cast["blocks.0.norm3.weight"].float())
    assert torch.equal(model.blocks[1].modulation, cast["blocks.1.modulation"].float())
    assert torch.equal(model(**inputs), same(**inputs))


def test_a_packed_file_without_its_scales_is_not_read_as_an_fp8_cast(tmp_path, base):
    """A dit8 packed file always holds a scale per 8-bit weight: one that lost all of them is refused,
    not loaded with scales of 1."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dit8.converters import convert

    packed = convert(write_checkpoint(base[0], tmp_path / "src.safetensors"), tmp_path / "p.safetensors",
                     scheme="fp8", report=False, progress=False).output
    with safe_open(str(packed), "pt") as f:
        metadata = f.metadata()
    stored = {k: v for k, v in load_file(str(packed)).items() if not k.endswith(".weight_scale")}
    save_file(stored, str(tmp_path / "q.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError) as err:
        dit8.open_dit(tmp_path / "q.safetensors")
    assert re.search(r"8-bit tensor 'blocks\.\d\.\S+\.weight' has no scale", str(err.value)), err.value


def test_an_int8_tensor_in_an_fp8_cast_is_the_one_named(tmp_path, base):
    """fp8 weights without scales are a cast dit8 reads; an int8 weight among them is what keeps the file
    from loading, so the refusal names it rather than one of the fp8 weights."""
    stored = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v
              for k, v in base[0].items()}
    stored["blocks.1.ffn.2.weight"] = torch.ones_like(stored["blocks.1.ffn.2.weight"], dtype=torch.int8)
    msg = error_of(stored, tmp_path / "q.safetensors")
    assert "8-bit tensor 'blocks.1.ffn.2.weight' has no scale" in msg, msg


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_nan_in_other_fp8_weights_read_as_floats(tmp_path, base, dtype):
    """fp8 weights of the formats read as floats (a .pth may hold the fnuz ones) are checked for NaN too:
    a CheckpointError naming the tensor, not an error from torch."""
    stored = {k: v.to(dtype) if k.startswith("blocks.") and v.ndim == 2 else v for k, v in base[0].items()}
    nan = torch.tensor(float("nan")).to(dtype).view(torch.uint8)
    stored["blocks.0.ffn.2.weight"].view(torch.uint8)[0, 0] = nan
    path = write_checkpoint(stored, tmp_path / "w.pth", fmt="pth")
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.ffn\.2\.weight' contains NaN values"):
        dit8.load_dit(path)


def _e4m3_half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e4m3fn values around |y| (float64): 2^(e-4) in [2^e, 2^(e+1)), 2^-10 below 2^-6."""
    return torch.pow(2.0, torch.floor(torch.log2(y.abs().clamp_min(2.0 ** -6))) - 4)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("form", ["dit8_file", "dit8_per_block", "lightx2v_per_block"])
def test_quantized_files_load_as_their_codes_and_scales(tmp_path, base, scheme, form):
    """load_dit puts a quantized file's codes into the model bit for bit, its scales (any float dtype, [out, 1]
    or [out]) as fp32 [out, 1], and every other tensor as the floats it holds; and what dit8 convert wrote
    dequantizes to the source within half a code step per weight (spec/quant-formats.md's round trip)."""
    from dit8.checkpoint import open_checkpoint
    from dit8.converters import convert

    weights = base[0]
    if form == "lightx2v_per_block":  # as LightX2V's converter writes it: block files, non_block, an index
        path = write_checkpoint(lightx2v_weights(weights, CONFIG, scheme, scale_dtype=torch.bfloat16,
                                                 flat_scale=True), tmp_path / "q", fmt="per_block")
        weight_map = {k: f.name for f in path.iterdir() for k in open_checkpoint(f).keys()}
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    else:
        src = write_checkpoint(weights, tmp_path / "src.safetensors", config=CONFIG)
        path = convert(src, tmp_path / ("q" if form == "dit8_per_block" else "q.safetensors"), scheme=scheme,
                       per_block=form == "dit8_per_block", report=False, progress=False).output
    with open_checkpoint(path) as ckpt:
        stored = {k: ckpt.read(k) for k in ckpt.keys()}
    state = dit8.load_dit(path).state_dict()
    assert set(state) == set(stored)
    linears = {f"blocks.{n}.{name}" for n in range(CONFIG.num_layers) for name in block_linears(CONFIG)}
    for key, value in stored.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in linears:
            assert state[key].dtype == QDTYPE[scheme] and torch.equal(state[key].view(torch.uint8),
                                                                       value.view(torch.uint8)), key
        elif key.endswith(".weight_scale"):
            assert state[key].dtype == torch.float32 and state[key].shape == (value.shape[0], 1), key
            assert torch.equal(state[key], value.float().reshape(-1, 1)), key
        else:
            assert value.dtype == torch.bfloat16 and torch.equal(state[key], value.float()), key
    if form.startswith("dit8"):
        for module in linears:
            w = weights[module + ".weight"].double()
            scale = state[module + ".weight_scale"].double()
            y = w / scale
            half = 0.5 if scheme == "int8" else _e4m3_half_step(y)
            err = (state[module + ".weight"].double() - y).abs()
            assert (err <= half + 1e-6 * y.abs()).all(), module  # (+ the fp32 rounding of w / scale)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_lightx2v_comfyui_export_with_0d_scales_and_a_bare_marker(tmp_path, base, scheme):
    """LightX2V's ComfyUI export: prefixed keys, one 0-dim scale per tensor (`<p>.scale_weight`, in the
    weights' dtype, amax / qmax of the whole tensor), and a `scaled_fp8` marker without the prefix, for
    int8 as for fp8. The block linears load as their codes with the one scale on every output channel."""
    weights = {k: v.bfloat16() for k, v in base[0].items()}
    linears = {f"blocks.{n}.{name}" for n in range(CONFIG.num_layers) for name in block_linears(CONFIG)}
    stored, scales = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for key, value in weights.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in linears:
            scales[module] = value.abs().max() / (127 if scheme == "int8" else 448)  # 0-dim bf16
            y = value.float() / scales[module].float()
            q = y.round().clamp(-128, 127).to(torch.int8) if scheme == "int8" else y.clamp(-448, 448).to(
                torch.float8_e4m3fn)
            stored[f"model.diffusion_model.{key}"] = q
            stored[f"model.diffusion_model.{module}.scale_weight"] = scales[module]
        else:
            stored[f"model.diffusion_model.{key}"] = value
    path = tmp_path / "wan_comfyui.safetensors"
    save_file(stored, str(path))
    assert dit8.open_dit(path).layout == "comfyui"
    state = dit8.load_dit(path).state_dict()
    for module, scale in scales.items():
        code = stored[f"model.diffusion_model.{module}.weight"]
        assert torch.equal(state[module + ".weight"].view(torch.uint8), code.view(torch.uint8)), module
        want = scale.float().expand(code.shape[0], 1)
        assert torch.equal(state[module + ".weight_scale"], want), module
    assert torch.equal(state["head.head.weight"], weights["head.head.weight"].float())


def test_comfyui_input_scales_are_passed_over(tmp_path, base):
    """ComfyUI's static activation scales (`<p>.scale_input` beside `<p>.scale_weight`, for its own fp8
    matmul) change nothing here, where activations are quantized per token: the file loads and runs as
    the same file without them. One beside no weight scale, or not one float, is refused."""
    weights, inputs = base
    stored, _ = comfyui_weights(weights, CONFIG)
    plain, hinted = tmp_path / "plain.safetensors", tmp_path / "hinted.safetensors"
    save_file(stored, str(plain))
    scales = [k.removesuffix(".scale_weight") for k in stored if k.endswith(".scale_weight")]
    save_file({**stored, **{m + ".scale_input": torch.tensor([0.05]) for m in scales}}, str(hinted))
    assert dit8.open_dit(hinted).quantized == dit8.open_dit(plain).quantized
    torch.testing.assert_close(dit8.load_dit(hinted)(**inputs), dit8.load_dit(plain)(**inputs), rtol=0, atol=0)

    orphan = tmp_path / "orphan.safetensors"
    save_file({**stored, "model.diffusion_model.head.head.scale_input": torch.tensor([0.05])}, str(orphan))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.diffusion_model\.head\.head\.scale_input'"):
        dit8.open_dit(orphan)
    damaged = tmp_path / "damaged.safetensors"
    save_file({**stored, scales[0] + ".scale_input": torch.ones(3)}, str(damaged))
    with pytest.raises(CheckpointError, match=rf"{re.escape(scales[0])}\.scale_input' is float32 of shape \[3\]; "
                                              r"ComfyUI's input scale is one float"):
        dit8.open_dit(damaged)
