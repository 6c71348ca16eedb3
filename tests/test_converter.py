"""dit8.converters: round trips from every layout and format, the packed format's metadata, LoRA
merge, safety (nothing left behind on any error), the streaming writer, and bounded memory."""

from __future__ import annotations

import argparse
import errno
import importlib
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dit8
from dit8 import CheckpointError, WanConfig
from dit8.checkpoint import open_checkpoint
from dit8.converters import (ConvertError, LoraSpec, SafetensorsWriter, TensorSpec, check_format_version, convert,
                             dequantize_weight, parse_lora, quantization_error, quantize_weight, scheme_of)
from dit8 import packed_format as fmt
from dit8.cli import add_convert_arguments
from dit8.converters.cli import run_convert
from dit8.converters.work_folder import work_folder, work_folder_path
from dit8.layouts import block_linears
from dit8.testing import FORMATS, LAYOUTS, random_weights, tiny_config, write_checkpoint

pytestmark = pytest.mark.cpu_only  # the converter runs on the CPU alone

FP8 = torch.float8_e4m3fn
# The module, not the function the package exports under the same name.
convert_module = importlib.import_module("dit8.converters.convert")
I2V = tiny_config("i2v")
T2V = tiny_config("t2v")


# ------------------------------------------------------------------------------------------ helpers


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_checkpoint(path) as ck:
        return {k: ck.read(k) for k in ck.keys()}, dict(ck.metadata)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (works for fp8, where torch.equal is not implemented everywhere)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _linears(config: WanConfig) -> set[str]:
    return {f"blocks.{n}.{name}" for n in range(config.num_layers) for name in block_linears(config)}


def _expected(weights: dict[str, torch.Tensor], config: WanConfig, scheme: str, keep=(),
              out_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The packed tensors as spec/quant-formats.md defines them, computed independently of convert."""
    linears = _linears(config)
    out = {}
    for key, w in weights.items():
        layer = key.removesuffix(".weight")
        if (scheme != "bf16" and key.endswith(".weight") and layer in linears
                and not any(fnmatch.fnmatchcase(layer, p) for p in keep)):
            out[key], out[layer + ".weight_scale"] = quantize_weight(w, scheme)
        else:
            out[key] = w.to(out_dtype)
    return out


def _assert_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    bad = [k for k in want if not _same(got[k], want[k])]
    assert not bad, f"differ: {bad[:5]}"


def _source(tmp_path: Path, weights, config, layout="official", form="safetensors", dtype=None) -> Path:
    folder = tmp_path / f"src_{layout}_{form}"
    folder.mkdir(parents=True, exist_ok=True)
    target = {"safetensors": folder / "model.safetensors", "pth": folder / "model.pth"}.get(form, folder / "ckpt")
    return write_checkpoint(weights, target, layout=layout, fmt=form, dtype=dtype, config=config)


@pytest.fixture(scope="module")
def i2v_weights():
    return random_weights(I2V, seed=0)


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("form", FORMATS)
def test_round_trip_every_layout_and_format(tmp_path, i2v_weights, layout, form):
    src = _source(tmp_path, i2v_weights, I2V, layout, form)
    config = dit8.open_dit(src).config
    for scheme in ("fp8", "int8", "bf16"):
        want = _expected(i2v_weights, I2V, scheme)
        for per_block in (False, True):
            dst = tmp_path / f"out_{scheme}{'' if per_block else '.safetensors'}"
            result = convert(src, dst, scheme=scheme, per_block=per_block, progress=False)
            got, meta = _read(dst)
            _assert_tensors(got, want)
            assert check_format_version(meta, dst) == fmt.FORMAT_VERSION
            assert WanConfig.from_dict(json.loads(meta[fmt.KEY_CONFIG])) == config
            assert meta[fmt.KEY_SOURCE_LAYOUT] == layout and meta[fmt.KEY_SCHEME] == scheme
            assert result.scheme == scheme and result.output == dst
            n_quantized = 0 if scheme == "bf16" else len(_linears(I2V))
            assert len(result.layers) == n_quantized
            if per_block:
                _check_per_block(dst, meta, scheme)
            if scheme == "bf16":  # a bf16 packed file is a plain float checkpoint for the loader
                assert dit8.open_dit(dst).config == config


def _check_per_block(dst: Path, meta: dict[str, str], scheme: str) -> None:
    names = {p.name for p in dst.iterdir()}
    expected = {"block_0.safetensors", "block_1.safetensors", fmt.NON_BLOCK_NAME, fmt.INDEX_NAME}
    assert names == expected | ({fmt.REPORT_NAME} if scheme != "bf16" else set())
    index = json.loads((dst / fmt.INDEX_NAME).read_text())
    for key, name in index["weight_map"].items():
        assert name == (f"block_{key.split('.')[1]}.safetensors" if key.startswith("blocks.") else fmt.NON_BLOCK_NAME)
    assert index["metadata"][fmt.KEY_SOURCE_DIGEST] == meta[fmt.KEY_SOURCE_DIGEST]
    tensor_bytes = 0
    for name in expected - {fmt.INDEX_NAME}:
        tensors, file_meta = _read(dst / name)
        assert file_meta == meta  # every file carries the full metadata
        tensor_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    # Hugging Face's convention for sharded checkpoints: the tensors' bytes, not the files' (no headers).
    assert index["metadata"]["total_size"] == tensor_bytes


def test_round_trip_bf16_source_and_t2v(tmp_path):
    weights = random_weights(T2V, seed=4)
    src = _source(tmp_path, weights, T2V, dtype=torch.bfloat16)
    source_bf16 = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    result = convert(src, tmp_path / "t2v.safetensors", scheme="int8", progress=False)
    got, _ = _read(tmp_path / "t2v.safetensors")
    _assert_tensors(got, _expected(source_bf16, T2V, "int8"))
    assert len(result.layers) == 10 * T2V.num_layers  # T2V blocks have no k_img/v_img


def test_streaming_in_small_row_blocks_gives_the_same_file(tmp_path, i2v_weights, monkeypatch):
    """Real models are streamed in many row blocks per tensor; tiny ones fit one. Force small blocks."""
    src = _source(tmp_path, i2v_weights, I2V)
    w = i2v_weights["blocks.1.ffn.0.weight"]
    up, down = _low_rank(*w.shape, 3, seed=9)
    diff = torch.randn(i2v_weights["time_projection.1.weight"].shape)
    save_file({"blocks.1.ffn.0.lora_up.weight": up, "blocks.1.ffn.0.lora_down.weight": down,
               "time_projection.1.diff": diff}, str(tmp_path / "l.safetensors"))
    lora = [str(tmp_path / "l.safetensors")]
    whole = convert(src, tmp_path / "whole.safetensors", lora=lora, progress=False)
    monkeypatch.setattr(convert_module, "BLOCK_ELEMENTS", 1000)  # a few rows per block
    blocks = convert(src, tmp_path / "blocks.safetensors", lora=lora, progress=False)
    got_whole, got_blocks = _read(tmp_path / "whole.safetensors")[0], _read(tmp_path / "blocks.safetensors")[0]
    merged = {**i2v_weights, "time_projection.1.weight": i2v_weights["time_projection.1.weight"] + diff}
    want = _expected(merged, I2V, "fp8")
    del want["blocks.1.ffn.0.weight"], want["blocks.1.ffn.0.weight_scale"]  # low-rank: compared below
    for got in (got_whole, got_blocks):
        _assert_tensors({k: v for k, v in got.items() if not k.startswith("blocks.1.ffn.0.weight")}, want)
    # Row blocks of up·down may take another BLAS path than the whole product: equal to rounding.
    merged_ffn = w + (up @ down)
    for got in (got_whole, got_blocks):
        q, s = got["blocks.1.ffn.0.weight"], got["blocks.1.ffn.0.weight_scale"]
        torch.testing.assert_close(s, quantize_weight(merged_ffn, "fp8")[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(dequantize_weight(q, s), merged_ffn, rtol=0.07, atol=1e-3)
    for a, b in zip(whole.layers, blocks.layers):
        assert a.layer == b.layer and a.rel_error == pytest.approx(b.rel_error, rel=1e-6)


@pytest.mark.parametrize("threads", [1, 3])
def test_torch_threads_leave_a_core_to_the_helpers_and_are_put_back(tmp_path, i2v_weights, monkeypatch, threads):
    """Quantization runs on one torch thread fewer (at least one): the hasher and the writer need a core."""
    seen = []
    measured = convert_module.quantize_weight_measured

    def spy(w, scheme):
        seen.append(torch.get_num_threads())
        if fail:
            raise RuntimeError("stop")
        return measured(w, scheme)

    monkeypatch.setattr(convert_module, "quantize_weight_measured", spy)
    before, fail = torch.get_num_threads(), False
    torch.set_num_threads(threads)
    try:
        src = _source(tmp_path, i2v_weights, I2V)
        convert(src, tmp_path / "out.safetensors", progress=False)
        assert seen and set(seen) == {max(1, threads - 1)}
        assert torch.get_num_threads() == threads
        fail = True
        with pytest.raises(RuntimeError, match="stop"):  # put back on failure too
            convert(src, tmp_path / "out2.safetensors", progress=False)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_overlapping_conversions_put_the_thread_count_back():
    """Conversions in two threads of one process overlap: the count is lowered once and put back when the
    last ends (each putting back the count it found would leave the process on the lowered one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        first, second = convert_module._threads_beside_helpers(), convert_module._threads_beside_helpers()
        first.__enter__()
        second.__enter__()
        assert torch.get_num_threads() == 2
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 2  # the second still converts
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_fp32_out_dtype_keeps_unquantized_tensors_exact(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    convert(src, tmp_path / "o.safetensors", scheme="fp8", out_dtype=torch.float32, progress=False)
    got, meta = _read(tmp_path / "o.safetensors")
    _assert_tensors(got, _expected(i2v_weights, I2V, "fp8", out_dtype=torch.float32))
    assert meta[fmt.KEY_DTYPE] == "fp32"


def test_metadata_schemes_keep_and_digest(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    keep = ["blocks.0.*", "blocks.1.ffn.*"]
    dst = tmp_path / "k.safetensors"
    convert(src, dst, scheme="fp8", keep=keep, progress=False)
    got, meta = _read(dst)
    _assert_tensors(got, _expected(i2v_weights, I2V, "fp8", keep=keep))
    assert set(meta) >= set(fmt.METADATA_KEYS)
    assert got["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert "blocks.0.self_attn.q.weight_scale" not in got and "blocks.1.ffn.0.weight_scale" not in got
    assert got["blocks.1.self_attn.q.weight"].dtype == FP8
    assert json.loads(meta[fmt.KEY_KEPT]) == keep
    schemes = json.loads(meta[fmt.KEY_SCHEMES])
    assert list(schemes)[-1] == "*"
    assert scheme_of(schemes, "blocks.1.self_attn.q") == "fp8"
    assert scheme_of(schemes, "blocks.0.self_attn.q") == "bf16"
    assert scheme_of(schemes, "blocks.1.ffn.2") == "bf16"
    assert scheme_of(schemes, "head.head") == "bf16"
    # The digest of a single source file is its sha256, as `sha256sum` prints it.
    assert meta[fmt.KEY_SOURCE_DIGEST] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta[fmt.KEY_TOOL_VERSION] == dit8.__version__
    # Without --keep, one group entry per linear name.
    convert(src, tmp_path / "all.safetensors", scheme="int8", progress=False)
    schemes = json.loads(_read(tmp_path / "all.safetensors")[1][fmt.KEY_SCHEMES])
    assert schemes == {**{f"blocks.*.{n}": "int8" for n in block_linears(I2V)}, "*": "bf16"}


def test_scheme_of_takes_an_exact_entry_first_then_the_first_matching_pattern():
    # spec: an exact module name wins wherever it stands, then the first fnmatch pattern in order.
    schemes = {"blocks.*.ffn.0": "fp8", "blocks.3.ffn.0": "bf16", "blocks.3.*": "int8", "*": "bf16"}
    assert scheme_of(schemes, "blocks.3.ffn.0") == "bf16"
    assert scheme_of(schemes, "blocks.2.ffn.0") == "fp8"
    assert scheme_of(schemes, "blocks.3.ffn.2") == "int8"
    assert scheme_of({"blocks.*": "fp8"}, "head.head") is None


@pytest.mark.parametrize("form", ["sharded", "per_block", "pth"])
def test_source_digest_of_folders_and_pickles(tmp_path, i2v_weights, form):
    src = _source(tmp_path, i2v_weights, I2V, form=form)
    dst = tmp_path / "o.safetensors"
    convert(src, dst, scheme="bf16", progress=False)
    digest = _read(dst)[1][fmt.KEY_SOURCE_DIGEST]
    if src.is_file():
        assert digest == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    else:
        files = sorted(p for p in src.iterdir() if p.suffix == ".safetensors")
        manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
        assert digest == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def test_a_folder_of_one_file_is_digested_as_a_folder(tmp_path, i2v_weights):
    # The folder's digest is its manifest's, however many tensor files it holds; only a file given as
    # the source is digested as its own sha256.
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(i2v_weights, str(folder / "model.safetensors"))
    convert(folder, tmp_path / "o.safetensors", scheme="bf16", progress=False)
    manifest = f"{hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()}  model.safetensors\n"
    assert _read(tmp_path / "o.safetensors")[1][fmt.KEY_SOURCE_DIGEST] == \
        "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def test_a_header_listing_tensors_out_of_data_order_is_read_in_file_order(tmp_path, i2v_weights):
    # safetensors writes its header in the order of the data; the format does not require it (other
    # writers sort the keys). The source is read, and digested, in the order of its offsets.
    src = tmp_path / "model.safetensors"
    save_file(i2v_weights, str(src))
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    reordered = json.dumps(dict(reversed(header.items())), separators=(",", ":")).encode()
    assert len(reordered) <= n and next(iter(json.loads(reordered))) != next(iter(header))
    src.write_bytes(raw[:8] + reordered + b" " * (n - len(reordered)) + raw[8 + n:])
    convert(src, tmp_path / "o.safetensors", scheme="bf16", progress=False)
    got, meta = _read(tmp_path / "o.safetensors")
    assert meta[fmt.KEY_SOURCE_DIGEST] == "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    _assert_tensors(got, _expected(i2v_weights, I2V, "bf16"))


def test_a_source_read_short_is_named_as_truncated():
    from dit8.converters.source import read_at

    with pytest.raises(CheckpointError, match=r"^m.safetensors: truncated inside tensor 'blocks.0.ffn.0.weight'$"):
        read_at(io.BytesIO(b"0123456789"), 4, 8, Path("m.safetensors"), "blocks.0.ffn.0.weight")
    assert read_at(io.BytesIO(b"0123456789"), 4, 6, Path("m.safetensors"), "k").tolist() == list(b"456789")


def test_quality_report(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "r.safetensors"
    result = convert(src, dst, scheme="int8", progress=False)
    report_path = tmp_path / "r.safetensors.quant_report.json"
    assert result.report == report_path
    report = json.loads(report_path.read_text())
    assert (report["source"], report["output"], report["scheme"]) == (str(src.absolute()), str(dst.absolute()), "int8")
    assert len(report["layers"]) == len(_linears(I2V)) == len(result.layers)
    for entry in report["layers"]:
        w = i2v_weights[entry["layer"] + ".weight"]
        rel, sqnr = quantization_error(w, *quantize_weight(w, "int8"))
        assert entry["rel_error"] == pytest.approx(rel, rel=1e-9)
        assert entry["sqnr_db"] == pytest.approx(sqnr, rel=1e-9)
    rels = [e.rel_error for e in result.layers]
    assert report["mean_rel_error"] == pytest.approx(sum(rels) / len(rels))
    assert [e["layer"] for e in report["worst"]] == [e.layer for e in result.worst]
    assert [e.rel_error for e in result.worst] == sorted(rels, reverse=True)[:5]
    # No report when asked not to, or when nothing is quantized; a stale one is removed on --force.
    convert(src, dst, scheme="bf16", force=True, progress=False)
    assert not report_path.exists()
    assert convert(src, tmp_path / "n.safetensors", scheme="fp8", report=False, progress=False).report is None
    assert not (tmp_path / "n.safetensors.quant_report.json").exists()



def test_an_exact_layer_is_null_in_the_report_and_left_out_of_the_mean_sqnr(tmp_path, i2v_weights):
    # An all-zero weight quantizes without error: SQNR +inf, which JSON cannot hold (the report is written
    # as null), and which the mean SQNR leaves out ("over the layers with a finite one").
    weights = dict(i2v_weights)
    exact = "blocks.0.self_attn.q"
    weights[exact + ".weight"] = torch.zeros_like(weights[exact + ".weight"])
    src = _source(tmp_path, weights, I2V)
    result = convert(src, tmp_path / "e.safetensors", scheme="int8", progress=False)

    def no_constants(name):
        raise AssertionError(f"the report holds {name}, which is not JSON")

    report = json.loads(result.report.read_text(), parse_constant=no_constants)
    by_layer = {e["layer"]: e for e in report["layers"]}
    assert by_layer[exact]["sqnr_db"] is None and by_layer[exact]["rel_error"] == 0
    finite = [e.sqnr_db for e in result.layers if e.layer != exact]
    assert all(math.isfinite(v) for v in finite) and len(finite) == len(result.layers) - 1
    assert report["mean_sqnr_db"] == pytest.approx(sum(finite) / len(finite)) == result.mean_sqnr_db


def test_keep_pattern_matching_nothing_is_refused(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    with pytest.raises(ConvertError, match="blocks.9"):
        convert(src, tmp_path / "o.safetensors", keep=["blocks.9.*"], progress=False)
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------------------------- LoRA


def _low_rank(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=gen) / 10, torch.randn(rank, inp, generator=gen) / 10


def _convert_fp32(tmp_path, src, lora, name="o.safetensors", keep=("blocks.0.self_attn.q",)):
    dst = tmp_path / name
    convert(src, dst, scheme="fp8", lora=lora, keep=list(keep), out_dtype=torch.float32, progress=False)
    return _read(dst)[0]


@pytest.mark.parametrize("style", ["up_down", "up_down_alpha", "B_A"])
@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_lora_low_rank_merge_is_exact(tmp_path, i2v_weights, style, prefix):
    src = _source(tmp_path, i2v_weights, I2V)
    up_name, down_name = ("lora_B", "lora_A") if style == "B_A" else ("lora_up", "lora_down")
    rank, alpha, strength = 4, (2.0 if style == "up_down_alpha" else None), 0.75
    # Targets: a kept block linear (stored fp32), a quantized one, and a non-block linear.
    targets = ["blocks.0.self_attn.q", "blocks.1.ffn.0", "text_embedding.0"]
    tensors, merged = {}, {}
    for i, module in enumerate(targets):
        w = i2v_weights[module + ".weight"]
        up, down = _low_rank(w.shape[0], w.shape[1], rank, seed=10 + i)
        tensors[f"{prefix}{module}.{up_name}.weight"] = up
        tensors[f"{prefix}{module}.{down_name}.weight"] = down.to(torch.bfloat16)  # mixed dtypes upcast
        if alpha is not None:
            tensors[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
        factor = strength * (alpha if alpha is not None else rank) / rank
        merged[module] = w.float() + (up.float() @ down.to(torch.bfloat16).float()) * factor
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    got = _convert_fp32(tmp_path, src, [f"{tmp_path / 'lora.safetensors'}:{strength}"])
    assert _same(got["blocks.0.self_attn.q.weight"], merged["blocks.0.self_attn.q"])
    assert _same(got["text_embedding.0.weight"], merged["text_embedding.0"])
    q, s = quantize_weight(merged["blocks.1.ffn.0"], "fp8")
    assert _same(got["blocks.1.ffn.0.weight"], q) and _same(got["blocks.1.ffn.0.weight_scale"], s)
    assert _same(got["blocks.1.self_attn.q.bias"], i2v_weights["blocks.1.self_attn.q.bias"])  # untouched


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_lora_full_diffs_are_exact(tmp_path, i2v_weights, prefix):
    src = _source(tmp_path, i2v_weights, I2V)
    gen = torch.Generator().manual_seed(3)
    # (lora key, target key): weight diff, bias diff, a bare parameter, a kept block linear.
    pairs = [("blocks.0.norm3.diff", "blocks.0.norm3.weight"),
             ("blocks.1.self_attn.q.diff_b", "blocks.1.self_attn.q.bias"),
             ("blocks.0.modulation.diff", "blocks.0.modulation"), ("head.head.diff", "head.head.weight"),
             ("blocks.0.self_attn.q.diff", "blocks.0.self_attn.q.weight")]
    tensors = {prefix + k: torch.randn(i2v_weights[t].shape, generator=gen) for k, t in pairs}
    save_file(tensors, str(tmp_path / "diff.safetensors"))
    got = _convert_fp32(tmp_path, src, [(tmp_path / "diff.safetensors", 2.0)])
    for k, t in pairs:
        assert _same(got[t], i2v_weights[t].float() + tensors[prefix + k] * 2.0), t


def test_lora_diffusers_names_and_several_files_in_order(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    w = i2v_weights["blocks.0.self_attn.q.weight"]
    up1, down1 = _low_rank(*w.shape, 3, seed=1)
    up2, down2 = _low_rank(*w.shape, 5, seed=2)
    save_file({"transformer.blocks.0.attn1.to_q.lora_B.weight": up1,
               "transformer.blocks.0.attn1.to_q.lora_A.weight": down1}, str(tmp_path / "a.safetensors"))
    save_file({"blocks.0.self_attn.q.lora_up.weight": up2, "blocks.0.self_attn.q.lora_down.weight": down2},
              str(tmp_path / "b.safetensors"))
    got = _convert_fp32(tmp_path, src, [(tmp_path / "a.safetensors", 0.5), str(tmp_path / "b.safetensors")])
    want = w.float() + (up1 @ down1) * 0.5
    want = want + (up2 @ down2) * 1.0
    assert _same(got["blocks.0.self_attn.q.weight"], want)


def test_lora_unmatched_keys_are_listed(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    up, down = _low_rank(256, 256, 2, seed=0)
    bad = ["diffusion_model.blocks.7.self_attn.q.lora_up.weight",
           "diffusion_model.blocks.7.self_attn.q.lora_down.weight",
           "diffusion_model.nothing.diff", "random.key"]
    tensors = {bad[0]: up, bad[1]: down, bad[2]: torch.zeros(3), bad[3]: torch.zeros(1),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up.clone(),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down.clone()}
    lora = tmp_path / "bad_lora.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as err:
        convert(src, out / "o.safetensors", lora=[str(lora)], progress=False)
    message = str(err.value)
    assert str(lora) in message and "4 LoRA key(s)" in message
    assert all(key in message for key in bad)
    assert "blocks.0.self_attn.q" not in message.replace("blocks.7", "")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["half_pair", "bad_shape", "nan", "transposed_diff", "two_styles", "two_prefixes",
                                  "ranks_differ", "rows_folded", "alpha_not_scalar", "alpha_bool", "alpha_alone",
                                  "bias_alone"])
def test_lora_bad_files(tmp_path, i2v_weights, case):
    src = _source(tmp_path, i2v_weights, I2V)
    up, down = _low_rank(256, 256, 2, seed=0)
    key = "diffusion_model.blocks.1.ffn.2"
    if case == "half_pair":
        tensors, match = {f"{key}.lora_up.weight": up}, "no matching"
    elif case == "bad_shape":
        tensors, match = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, "do not make a delta"
    elif case in ("ranks_differ", "rows_folded"):  # [256, 512] target: up [256, 2] · down [4, 512], [512, 2] · [2, 256]
        up, down = _low_rank(256, 512, 2, seed=0) if case == "ranks_differ" else _low_rank(512, 256, 2, seed=0)
        if case == "ranks_differ":
            down = torch.cat([down, down])
        tensors, match = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, "do not make a delta"
    elif case in ("alpha_not_scalar", "alpha_bool"):
        up, down = _low_rank(256, 512, 2, seed=0)
        alpha, match = ((torch.tensor([2.0, 2.0]), "expected a scalar") if case == "alpha_not_scalar"
                        else (torch.tensor(True), "alpha' has dtype torch.bool, expected a float"))
        tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": alpha}
    elif case == "alpha_alone":  # an alpha without its pair scales nothing: a key that matches nothing
        tensors, match = {f"{key}.alpha": torch.tensor(2.0)}, r"1 LoRA key\(s\) match no weight of the model: .*alpha"
    elif case == "bias_alone":  # a pair's bias (PEFT's lora_bias) has no scale without its pair
        tensors, match = {f"{key}.lora_B.bias": torch.zeros(256)}, "has no lora_A/lora_B pair to scale it by"
    elif case == "transposed_diff":  # as many elements as the target, in the wrong layout
        diff = torch.zeros(i2v_weights["blocks.1.ffn.2.weight"].shape[::-1])
        tensors, match = {f"{key}.diff": diff}, r"has shape \(512, 256\), its target 'blocks.1.ffn.2.weight'"
    elif case == "two_styles":  # one module's up twice: which pairs with which is a guess
        up, down = _low_rank(256, 512, 2, seed=0)
        tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.lora_B.weight": up.clone(),
                   f"{key}.lora_A.weight": down.clone()}
        match = "are both the (up|down) of 'blocks.1.ffn.2'"
    elif case == "two_prefixes":
        up, down = _low_rank(256, 512, 2, seed=0)
        bare = key.removeprefix("diffusion_model.")
        tensors = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{bare}.lora_up.weight": up.clone(),
                   f"{bare}.lora_down.weight": down.clone()}
        match = "are both the (up|down) of 'blocks.1.ffn.2'"
    else:
        up, down = _low_rank(256, 512, 2, seed=0)
        down[0, 0] = float("nan")
        tensors, match = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, "lora_down.weight.*NaN"
    lora = tmp_path / "l.safetensors"
    save_file(tensors, str(lora))
    with pytest.raises(CheckpointError, match=match) as err:
        convert(src, tmp_path / "o.safetensors", lora=[str(lora)], progress=False)
    assert str(lora) in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfyui"])
def test_a_dit_given_as_a_lora(tmp_path, i2v_weights, layout):
    """A DiT given to --lora (the model in the LoRA's place) is named as one, not listed key by key."""
    src = _source(tmp_path, i2v_weights, I2V)
    other = write_checkpoint(i2v_weights, tmp_path / "other" / "dit.safetensors", layout=layout)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as err:
        convert(src, out / "o.safetensors", lora=[str(other)], progress=False)
    assert re.fullmatch(rf"{re.escape(str(other))}: a DiT checkpoint \(it holds the model's own tensors, such as "
                        r"'\S+', and no LoRA factors or deltas\), not a LoRA: give it as the model to convert; "
                        r"--lora takes LoRA files", str(err.value)), str(err.value)
    assert _listing(out) == []


def _pair_file(tmp_path, i2v_weights, names, *, rank=4, seed=20, extra=None, metadata=None, name="l.safetensors"):
    """A LoRA file with a low-rank pair on blocks.0.self_attn.q and blocks.1.ffn.2, its keys spelt by
    names(module, "up" | "down"); returns (path, {official module: up @ down})."""
    tensors, products = dict(extra or {}), {}
    for i, module in enumerate(["blocks.0.self_attn.q", "blocks.1.ffn.2"]):
        w = i2v_weights[module + ".weight"]
        up, down = _low_rank(w.shape[0], w.shape[1], rank, seed=seed + i)
        tensors[names(module, "up")], tensors[names(module, "down")] = up, down
        products[module] = up @ down
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path, products


def _check_pairs(tmp_path, i2v_weights, src, lora, products, factor, name="o.safetensors"):
    got = _convert_fp32(tmp_path, src, lora, name=name, keep=("blocks.0.self_attn.q", "blocks.1.ffn.2"))
    for module, product in products.items():
        want = i2v_weights[module + ".weight"].float() + product * factor
        assert _same(got[module + ".weight"], want), module
    return got


_DIFFUSERS_NAMES = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.ffn.2": "blocks.1.ffn.net.2"}


@pytest.mark.parametrize("where", ["header", "header_pipeline", "adapter_config"])
def test_lora_alpha_from_peft_metadata(tmp_path, i2v_weights, where):
    """diffusers and PEFT keep lora_alpha in the safetensors header or adapter_config.json, not in tensors."""
    src = _source(tmp_path, i2v_weights, I2V)
    rank, alpha = 4, 16
    config = {"r": rank, "lora_alpha": alpha, "peft_type": "LORA", "use_rslora": False, "use_dora": False,
              "alpha_pattern": {"ffn.net.2": 2}, "rank_pattern": {}}
    if where == "header_pipeline":  # WanLoraLoaderMixin.save_lora_weights prefixes the component
        config = {f"transformer.{k}": v for k, v in config.items()}
    metadata = {"lora_adapter_metadata": json.dumps(config)} if where.startswith("header") else None
    folder = tmp_path / "adapter"
    folder.mkdir()
    path, products = _pair_file(folder, i2v_weights, lambda m, r: f"transformer.{_DIFFUSERS_NAMES[m]}."
                                f"lora_{'B' if r == 'up' else 'A'}.weight", metadata=metadata,
                                name="adapter_model.safetensors")
    if where == "adapter_config":
        (folder / "adapter_config.json").write_text(json.dumps(config))
    got = _convert_fp32(tmp_path, src, [(folder if where == "adapter_config" else path, 0.5)],
                        keep=("blocks.0.self_attn.q", "blocks.1.ffn.2"))
    w = i2v_weights
    assert _same(got["blocks.0.self_attn.q.weight"],
                 w["blocks.0.self_attn.q.weight"].float() + products["blocks.0.self_attn.q"] * (0.5 * alpha / rank))
    assert _same(got["blocks.1.ffn.2.weight"],  # alpha_pattern matches the module's name as the file writes it
                 w["blocks.1.ffn.2.weight"].float() + products["blocks.1.ffn.2"] * (0.5 * 2 / rank))


def test_lora_rslora_divides_by_the_root_of_the_rank(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True}
    path, products = _pair_file(tmp_path, i2v_weights, lambda m, r: f"{m}.lora_{'B' if r == 'up' else 'A'}.weight",
                                metadata={"lora_adapter_metadata": json.dumps(config)})
    _check_pairs(tmp_path, i2v_weights, src, [path], products, 1.0 * 8 / math.sqrt(4))


@pytest.mark.parametrize("case", ["dora", "loha", "dora_tensor", "alpha_disagrees", "alpha_zero", "bad_json",
                                  "rank_disagrees", "rslora_tensor_alpha", "pissa", "bad_pattern", "flag_pattern",
                                  "bias_twice", "alpha_past_float", "nested_pattern", "huge_repeat_pattern"])
def test_lora_adapters_that_cannot_be_merged_are_refused(tmp_path, i2v_weights, case):
    src = _source(tmp_path, i2v_weights, I2V)
    names = lambda m, r: f"{m}.lora_{'up' if r == 'up' else 'down'}.weight"  # noqa: E731
    metadata, extra = None, {}
    header = lambda **config: {"lora_adapter_metadata": json.dumps(config)}  # noqa: E731
    if case == "rank_disagrees":  # PEFT would not load tensors of another rank than its config's
        metadata, match = header(r=8, lora_alpha=16), "has rank 4, .* says 8"
    elif case == "rslora_tensor_alpha":
        metadata, match = header(use_rslora=True), "alpha / rank or alpha / √rank is ambiguous"
        extra = {"blocks.0.self_attn.q.alpha": torch.tensor(8.0)}
    elif case == "pissa":  # a delta against base weights PiSSA changed
        metadata, match = header(lora_alpha=4, init_lora_weights="pissa_niter_4"), "changes the base weights"
    elif case == "bad_pattern":
        metadata, match = header(lora_alpha=4, alpha_pattern={"blocks.[0": 2}), "is not a regular expression"
    elif case == "flag_pattern":  # valid alone, not inside the expression a pattern is matched with
        metadata, match = header(lora_alpha=4, rank_pattern={"(?i)self_attn": 4}), "is not a regular expression"
    elif case == "nested_pattern":  # re's parser recurses per group: RecursionError, not re.error
        nested = "(" * 1000 + ")" * 1000
        metadata, match = header(lora_alpha=4, alpha_pattern={nested: 2}), "is not a regular expression"
    elif case == "huge_repeat_pattern":  # OverflowError, not re.error
        metadata, match = header(lora_alpha=4, rank_pattern={"q{99999999999}": 4}), "is not a regular expression"
    elif case == "bias_twice":  # diffusers' name for a .diff_b beside the .diff_b itself
        bias = torch.zeros(i2v_weights["blocks.0.self_attn.q.bias"].shape)
        extra = {"blocks.0.self_attn.q.diff_b": bias, "blocks.0.self_attn.q.lora_B.bias": bias.clone()}
        match = "'blocks.0.self_attn.q.(diff_b|lora_B.bias)' and .* both change 'blocks.0.self_attn.q.bias'"
    elif case == "dora":
        metadata, match = {"lora_adapter_metadata": json.dumps({"r": 4, "use_dora": True})}, "DoRA adapter"
    elif case == "loha":
        metadata, match = {"lora_adapter_metadata": json.dumps({"peft_type": "LOHA"})}, "a LOHA adapter"
    elif case == "dora_tensor":
        extra, match = {"blocks.0.self_attn.q.dora_scale": torch.ones(1, 256)}, "a DoRA adapter"
    elif case == "alpha_disagrees":
        metadata = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})}
        extra, match = {"blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, "= 4 and .*says alpha 8"
    elif case == "alpha_zero":
        extra, match = {"blocks.0.self_attn.q.alpha": torch.tensor(0.0)}, "alpha.* is 0"
    elif case == "alpha_past_float":  # JSON integers have no bound; float() of this one overflows
        metadata, match = header(lora_alpha=10**400), "lora_alpha is 1000.*expected a finite nonzero number"
    else:
        metadata, match = {"lora_adapter_metadata": "{r: 4"}, "lora_adapter_metadata: not valid JSON"
    path, _ = _pair_file(tmp_path, i2v_weights, names, metadata=metadata, extra=extra)
    with pytest.raises(CheckpointError, match=match) as err:
        convert(src, tmp_path / "o.safetensors", lora=[path], progress=False)
    assert str(path) in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_peft_configs_where_the_files_were_renamed_or_left_alpha_out(tmp_path, i2v_weights):
    """alpha_pattern written for diffusers' names still applies to keys renamed to official ones; a config
    without lora_alpha gets PEFT's default 8; adapter_config.json beside a renamed weights file is read
    (no adapter_model.* there it could belong to), and ignored beside another file of a PEFT folder."""
    src = _source(tmp_path, i2v_weights, I2V)
    official = lambda m, r: f"diffusion_model.{m}.lora_{'B' if r == 'up' else 'A'}.weight"  # noqa: E731
    config = {"r": 4, "lora_alpha": 16, "alpha_pattern": {"ffn.net.2": 2}}
    header = lambda **config: {"lora_adapter_metadata": json.dumps(config)}  # noqa: E731
    path, products = _pair_file(tmp_path, i2v_weights, official, metadata=header(**config))
    got = _convert_fp32(tmp_path, src, [path], keep=("blocks.0.self_attn.q", "blocks.1.ffn.2"))
    want = i2v_weights["blocks.1.ffn.2.weight"].float() + products["blocks.1.ffn.2"] * (2 / 4)
    assert _same(got["blocks.1.ffn.2.weight"], want)
    path, products = _pair_file(tmp_path, i2v_weights, official, metadata=header(r=4), name="no_alpha.safetensors")
    _check_pairs(tmp_path, i2v_weights, src, [path], products, 8 / 4, name="o2.safetensors")
    beside = tmp_path / "renamed"
    beside.mkdir()
    (beside / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 32}))
    path, products = _pair_file(beside, i2v_weights, official, name="my_style.safetensors")
    _check_pairs(tmp_path, i2v_weights, src, [path], products, 32 / 4, name="o3.safetensors")
    _pair_file(beside, i2v_weights, official, name="adapter_model.safetensors", seed=40)
    _check_pairs(tmp_path, i2v_weights, src, [path], products, 1.0, name="o4.safetensors")


def test_a_dangling_adapter_config_json_is_not_read_as_none(tmp_path, i2v_weights):
    """A LoRA folder's adapter_config.json that links to nothing (a Hugging Face cache's blob never fetched)
    would leave the merge at the default alpha: refused, saying so."""
    src = _source(tmp_path, i2v_weights, I2V)
    folder = tmp_path / "lora"
    folder.mkdir()
    official = lambda m, r: f"diffusion_model.{m}.lora_{'B' if r == 'up' else 'A'}.weight"  # noqa: E731
    _pair_file(folder, i2v_weights, official, name="adapter_model.safetensors")
    (folder / "adapter_config.json").symlink_to(tmp_path / "blobs" / "missing")
    with pytest.raises(CheckpointError, match=f"^{folder / 'adapter_config.json'}: a symbolic link to "
                                              f"{tmp_path / 'blobs' / 'missing'}, which does not exist$"):
        convert(src, tmp_path / "o.safetensors", lora=[str(folder)], progress=False)


def test_lora_folder_whose_files_carry_different_peft_configs_is_refused(tmp_path, i2v_weights):
    """A LoRA split over files scales alike: parts whose headers disagree would be merged at one part's alpha."""
    src = _source(tmp_path, i2v_weights, I2V)
    folder = tmp_path / "split"
    folder.mkdir()
    for i, (module, alpha) in enumerate((("blocks.0.self_attn.q", 16), ("blocks.1.ffn.2", 2))):
        up, down = _low_rank(*i2v_weights[module + ".weight"].shape, 4, seed=50 + i)
        header = {"lora_adapter_metadata": json.dumps({"lora_alpha": alpha})}
        save_file({f"{module}.lora_B.weight": up, f"{module}.lora_A.weight": down},
                  str(folder / f"part{i}.safetensors"), metadata=header)
    with pytest.raises(CheckpointError, match="files' lora_adapter_metadata headers differ"):
        convert(src, tmp_path / "o.safetensors", lora=[folder], progress=False)


@pytest.mark.parametrize("style", ["kohya", "peft_default", "peft_model"])
def test_lora_key_spellings_of_other_tools(tmp_path, i2v_weights, style):
    """musubi-tuner / kohya (lora_unet_ names, integer alpha), PEFT's adapter name, PeftModel's prefix."""
    src = _source(tmp_path, i2v_weights, I2V)
    rank = 4
    if style == "kohya":
        names = lambda m, r: f"lora_unet_{m.replace('.', '_')}.lora_{r}.weight"  # noqa: E731
        extra = {f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(2) for m in _DIFFUSERS_NAMES}
        factor = 0.5 * 2 / rank
    elif style == "peft_default":
        names = lambda m, r: f"diffusion_model.{m}.lora_{'B' if r == 'up' else 'A'}.default.weight"  # noqa: E731
        extra, factor = {}, 0.5
    else:
        names = lambda m, r: f"base_model.model.{_DIFFUSERS_NAMES[m]}.lora_{'B' if r == 'up' else 'A'}.weight"  # noqa: E731
        extra, factor = {}, 0.5
    path, products = _pair_file(tmp_path, i2v_weights, names, rank=rank, extra=extra)
    _check_pairs(tmp_path, i2v_weights, src, [(path, 0.5)], products, factor)


def test_lora_modulation_diff_m_and_pair_bias(tmp_path, i2v_weights):
    """LightX2V's `.diff_m` (a block's or the head's modulation) and PEFT's lora_B.bias (scaled as its pair)."""
    src = _source(tmp_path, i2v_weights, I2V)
    gen = torch.Generator().manual_seed(5)
    diff_m = {m: torch.randn(i2v_weights[m + ".modulation"].shape, generator=gen) for m in ("blocks.1", "head")}
    bias = torch.randn(i2v_weights["blocks.0.self_attn.q.bias"].shape, generator=gen)
    extra = {f"diffusion_model.{m}.diff_m": d for m, d in diff_m.items()}
    extra["diffusion_model.blocks.0.self_attn.q.lora_B.bias"] = bias
    extra["diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(8.0)
    path, products = _pair_file(tmp_path, i2v_weights, lambda m, r: f"diffusion_model.{m}.lora_"
                                f"{'B' if r == 'up' else 'A'}.weight", extra=extra)
    got = _convert_fp32(tmp_path, src, [(path, 0.5)], keep=("blocks.0.self_attn.q", "blocks.1.ffn.2"))
    for m, d in diff_m.items():
        assert _same(got[m + ".modulation"], i2v_weights[m + ".modulation"].float() + d * 0.5), m
    factor = 0.5 * 8.0 / 4
    assert _same(got["blocks.0.self_attn.q.weight"],
                 i2v_weights["blocks.0.self_attn.q.weight"].float() + products["blocks.0.self_attn.q"] * factor)
    assert _same(got["blocks.0.self_attn.q.bias"], i2v_weights["blocks.0.self_attn.q.bias"].float() + bias * factor)


def test_lora_one_module_under_two_names_is_refused(tmp_path, i2v_weights):
    """Official and diffusers names of one module in one file would merge its delta twice."""
    src = _source(tmp_path, i2v_weights, I2V)
    w = i2v_weights["blocks.0.self_attn.q.weight"]
    up, down = _low_rank(*w.shape, 2, seed=0)
    lora = tmp_path / "l.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
               "transformer.blocks.0.attn1.to_q.lora_B.weight": up.clone(),
               "transformer.blocks.0.attn1.to_q.lora_A.weight": down.clone()}, str(lora))
    names = "'blocks.0.(self_attn.q|attn1.to_q)'"
    with pytest.raises(CheckpointError, match=f"{names} and {names} both change 'blocks.0.self_attn.q.weight'"):
        convert(src, tmp_path / "o.safetensors", lora=[lora], progress=False)


def test_alpha_pattern_keys_match_a_module_name_end_as_peft_matches_them():
    from dit8.converters.lora_formats import AdapterConfig

    # PEFT's get_pattern_key: a key matches the end of a module's name, whole dot-separated parts.
    config = AdapterConfig("cfg", alpha_pattern={"self_attn.q": 16.0, "blocks.1": 4.0, "o": 2.0})
    assert config.alpha_of(["blocks.0.self_attn.q"]) == 16.0
    assert config.alpha_of(["blocks.1.ffn.0"]) is None  # a name's start is no match
    assert config.alpha_of(["blocks.0.attn1.to_out.0"]) is None  # nor a part of a name ("o" in "to_out")
    assert config.alpha_of(["blocks.0.cross_attn.o"]) == 2.0
    # One module whose names (official, diffusers) get different alphas: which is meant is a guess.
    both = AdapterConfig("cfg", alpha_pattern={"self_attn.q": 16.0, "to_q": 8.0})
    with pytest.raises(CheckpointError, match="cfg: alpha_pattern gives 'blocks.0.self_attn.q' different values"):
        both.alpha_of(["blocks.0.self_attn.q", "blocks.0.attn1.to_q"])


@pytest.mark.parametrize("config, match", [
    ({"lora_alpha": 0}, "lora_alpha is 0, expected a finite nonzero number"),
    ({"r": 0}, "r is 0, expected a positive integer"),
    ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] is 0, expected a positive integer")])
def test_adapter_configs_that_scale_by_nothing_are_refused(config, match):
    from dit8.converters.lora_formats import parse_adapter_config

    with pytest.raises(CheckpointError, match=rf"^cfg: {match}"):
        parse_adapter_config(config, "cfg")


@pytest.mark.parametrize("config, match", [
    ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),  # a true string: on
    ({"use_dora": "false"}, "use_dora must be true or false, got 'false'"),
    ({"init_lora_weights": ["pissa"]}, r"init_lora_weights must be true, false or a method's name, got \['pissa'\]")])
def test_adapter_config_flags_of_another_type_are_refused(config, match):
    from dit8.converters.lora_formats import parse_adapter_config

    with pytest.raises(CheckpointError, match=rf"^cfg: {match}$"):
        parse_adapter_config(config, "cfg")
    assert parse_adapter_config({"use_rslora": None, "use_dora": False}, "cfg").rslora is False


def test_a_header_config_and_an_adapter_config_json_that_disagree_are_refused(tmp_path):
    from dit8.converters.lora_formats import ADAPTER_METADATA_KEY, read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "r": 4}))
    path = tmp_path / "adapter_model.safetensors"
    agreeing = read_adapter_config(path, {ADAPTER_METADATA_KEY: json.dumps({"lora_alpha": 8, "r": 4})})
    assert (agreeing.alpha, agreeing.rank) == (8.0, 4)
    with pytest.raises(CheckpointError, match="describe the LoRA differently"):
        read_adapter_config(path, {ADAPTER_METADATA_KEY: json.dumps({"lora_alpha": 16, "r": 4})})


def test_parse_lora_arguments(tmp_path):
    assert parse_lora("a/b.safetensors:0.5") == parse_lora(("a/b.safetensors", 0.5))
    assert parse_lora("a/b.safetensors").strength == 1.0
    assert parse_lora("C:/x.safetensors").path == Path("C:/x.safetensors")  # the colon is the path's
    assert parse_lora("C:/x.safetensors:0.5") == LoraSpec(Path("C:/x.safetensors"), 0.5)  # the last colon: a strength
    assert parse_lora("x.safetensors:-1e-1").strength == -0.1
    assert parse_lora(Path("x.safetensors:0.5")) == LoraSpec(Path("x.safetensors:0.5"))  # a Path names a file
    with pytest.raises(CheckpointError, match="finite"):
        parse_lora("x.safetensors:nan")
    (tmp_path / "l.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="l.safetensors: LoRA strength 'abc' is not a number"):
        parse_lora(f"{tmp_path / 'l.safetensors'}:abc")
    with pytest.raises(CheckpointError, match="a LoRA file name is empty"):  # not the current folder
        parse_lora("")
    with pytest.raises(CheckpointError, match="must be \\(path, strength\\).*the file name is empty"):
        parse_lora(("", 0.5))
    with pytest.raises(CheckpointError, match="a LoRA file name is empty"):
        parse_lora(LoraSpec("", 0.5))
    # Not a path: refused by type, not read as a file named 'None', '5', '[]' or "b'x.safetensors'".
    for bad in (None, 5, [], b"x.safetensors", 0.5):
        with pytest.raises(CheckpointError, match=f"a LoRA must be a path \\(str or os.PathLike\\), a \\(path, "
                                                  f"strength\\) pair or a LoraSpec, got {type(bad).__name__}"):
            parse_lora(bad)
    # A bool is no strength (float(True) counted as 1), in a pair or a LoraSpec; a LoraSpec's fields are
    # checked as the other forms' are.
    for bad in [("x.safetensors", True), ("x.safetensors", False)]:
        with pytest.raises(CheckpointError, match=f"must be \\(path, strength\\).*strength {bad[1]} is a bool"):
            parse_lora(bad)
    for bad in [("x.safetensors", np.True_), ("x.safetensors", "0.5")]:  # refused as in a LoraSpec
        with pytest.raises(CheckpointError, match="must be \\(path, strength\\).*is not a number"):
            parse_lora(bad)
    assert parse_lora(("x.safetensors", np.float32(0.5))) == LoraSpec(Path("x.safetensors"), 0.5)
    for bad in (True, "0.5", None, math.nan):
        with pytest.raises(CheckpointError, match="x.safetensors: LoRA strength .* not a "):
            parse_lora(LoraSpec(Path("x.safetensors"), bad))
    with pytest.raises(CheckpointError, match="a LoraSpec's path must be a str or os.PathLike, got NoneType"):
        parse_lora(LoraSpec(None, 0.5))
    assert parse_lora(LoraSpec("x.safetensors", 1)) == LoraSpec(Path("x.safetensors"), 1.0)


# ----------------------------------------------------------------------------------------- safety


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_existing_report_beside_dst_needs_force(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "o.safetensors"
    report = tmp_path / "o.safetensors.quant_report.json"
    report.write_text("mine")
    for no_report in (False, True):  # replaced, or removed as stale
        with pytest.raises(ConvertError, match="quant_report.json: already exists"):
            convert(src, dst, report=not no_report, progress=False)
        assert report.read_text() == "mine" and not dst.exists()
    convert(src, dst, force=True, progress=False)
    assert json.loads(report.read_text())


def test_force_replaces_a_report_file_but_no_folder_and_never_an_input(tmp_path, i2v_weights):
    """--force replaces (or, with no report, removes) what lies at the report path beside DST: never a folder
    there, nor the source or a LoRA, which it would have deleted."""
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    report = tmp_path / "o.safetensors.quant_report.json"
    report.mkdir()
    (report / "mine.txt").write_text("mine")
    for no_report in (False, True):
        with pytest.raises(ConvertError, match=f"^{report}: a folder where the output's report goes; --force "
                                               f"replaces only a report file"):
            convert(src, dst, report=not no_report, force=True, progress=False)
    assert (report / "mine.txt").read_text() == "mine" and not dst.exists()
    # A LoRA folder (one LoRA over its files) at the report path, then the source there.
    (report / "mine.txt").unlink()
    save_file({"blocks.0.self_attn.q.diff": torch.zeros(I2V.dim, I2V.dim)}, str(report / "part1.safetensors"))
    with pytest.raises(ConvertError, match=f"^{report}: the report beside the output must not be, contain or "
                                           f"lie inside the LoRA {report}$"):
        convert(src, dst, lora=[str(report)], force=True, progress=False)
    assert (report / "part1.safetensors").is_file()
    shutil.rmtree(report)
    moved = src.rename(report)
    with pytest.raises(ConvertError, match=f"^{report}: the report beside the output must not be, contain or "
                                           f"lie inside the source {moved}$"):
        convert(moved, dst, force=True, progress=False)
    assert moved.is_file() and not dst.exists()


def test_a_per_block_folder_replacing_a_file_leaves_no_stale_report(tmp_path, i2v_weights):
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    convert(src, dst, progress=False)
    stale = tmp_path / "o.safetensors.quant_report.json"
    assert stale.is_file()
    dst.unlink()  # only the report is left: it still needs --force
    with pytest.raises(ConvertError, match=r"o\.safetensors\.quant_report\.json: already exists"):
        convert(src, dst, per_block=True, progress=False)
    convert(src, dst, progress=False, force=True)
    convert(src, dst, per_block=True, force=True, progress=False)
    assert dst.is_dir() and (dst / "quant_report.json").is_file() and not stale.exists()


def test_an_output_folder_that_is_not_writable(tmp_path, i2v_weights, monkeypatch):
    src = _source(tmp_path, i2v_weights, I2V)
    monkeypatch.setattr(convert_module.os, "access", lambda path, mode: False)  # root may write anywhere
    with pytest.raises(ConvertError, match=f"{tmp_path}: the output folder is not writable"):
        convert(src, tmp_path / "o.safetensors", progress=False)


def test_existing_dst_needs_force(tmp_path, i2v_weights, capsys):
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"old")
    with pytest.raises(ConvertError, match="already exists; pass force=True to replace it"):
        convert(src, dst, progress=False)
    assert dst.read_bytes() == b"old"
    from dit8.cli import main

    assert main(["convert", str(src), str(dst)]) == 1  # the command line names its flag
    assert capsys.readouterr().err.strip() == f"dit8: error: {dst}: already exists; pass --force to replace it"
    for paths, which in (((src, ""), "dst"), (("", dst), "src")):
        with pytest.raises(ConvertError, match=f"^{which}: the path is empty$"):
            convert(*paths, progress=False)
    convert(src, dst, scheme="int8", force=True, progress=False)
    _assert_tensors(_read(dst)[0], _expected(i2v_weights, I2V, "int8"))
    # A per-block folder replaces an old output whole (no stale block files survive), but --force never
    # deletes a folder that holds anything else.
    folder = tmp_path / "pb"
    folder.mkdir()
    (folder / "block_99.safetensors").write_text("x")
    (folder / "stray.txt").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, folder, per_block=True, progress=False)
    with pytest.raises(ConvertError, match=r"more than a dit8 per-block output \(e\.g\. stray\.txt\)"):
        convert(src, folder, per_block=True, force=True, progress=False)
    assert sorted(_listing(folder)) == ["block_99.safetensors", "stray.txt"]
    (folder / "stray.txt").unlink()
    convert(src, folder, per_block=True, force=True, progress=False)
    assert "block_99.safetensors" not in _listing(folder)
    # ... and a single file may replace a folder.
    convert(src, folder.with_suffix(".safetensors"), progress=False)
    weird = tmp_path / "dir.safetensors"
    weird.mkdir()
    convert(src, weird, force=True, progress=False)
    assert weird.is_file()
    assert not [n for n in _listing(tmp_path) if n.startswith(".")]  # no temporaries anywhere



@pytest.mark.parametrize("name", ["block_old.safetensors", "block_.safetensors", "block_1.safetensors.bak"])
def test_force_keeps_a_folder_with_a_file_that_only_looks_like_a_block_file(tmp_path, i2v_weights, name):
    # --force deletes a per-block output's own files only: block_<number>.safetensors and the rest it writes.
    src = _source(tmp_path, i2v_weights, I2V)
    folder = tmp_path / "pb"
    folder.mkdir()
    (folder / "block_0.safetensors").write_text("x")
    (folder / name).write_text("x")
    with pytest.raises(ConvertError, match=rf"more than a dit8 per-block output \(e\.g\. {re.escape(name)}\)"):
        convert(src, folder, per_block=True, force=True, progress=False)
    assert sorted(_listing(folder)) == sorted(["block_0.safetensors", name])


def _appearing_during_the_conversion(monkeypatch, make):
    """Run `make()` (somebody else writing at DST) after every tensor is written, before the install."""
    write_all = convert_module._write_all

    def write_then_make(*args, **kwargs):
        layers = write_all(*args, **kwargs)
        make()
        return layers

    monkeypatch.setattr(convert_module, "_write_all", write_then_make)


@pytest.mark.parametrize("per_block", [False, True])
def test_an_output_that_appears_during_the_conversion_is_not_replaced(tmp_path, i2v_weights, monkeypatch,
                                                                      per_block):
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    report = tmp_path / "o.safetensors.quant_report.json"
    before = _listing(tmp_path)

    def theirs():
        if per_block:
            dst.mkdir(exist_ok=True)
            (dst / "notes.txt").write_text("mine")
        else:
            dst.write_text("mine")

    _appearing_during_the_conversion(monkeypatch, theirs)
    with pytest.raises(ConvertError, match=r"o\.safetensors: appeared while converting and was left as it is"):
        convert(src, dst, per_block=per_block, progress=False)
    assert (dst / "notes.txt" if per_block else dst).read_text() == "mine" and not report.exists()
    assert _listing(tmp_path) == sorted(before + ["o.safetensors"])  # nothing of the conversion's
    if per_block:  # with --force, a folder that came to hold other files is still refused
        monkeypatch.setattr(convert_module, "_check_paths", lambda *args: None)
        with pytest.raises(ConvertError, match=r"more than a dit8 per-block output \(e\.g\. notes\.txt\)"):
            convert(src, dst, per_block=True, force=True, progress=False)
        assert _listing(dst) == ["notes.txt"]


def test_a_report_that_appears_during_the_conversion_is_not_replaced(tmp_path, i2v_weights, monkeypatch):
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    report = tmp_path / "o.safetensors.quant_report.json"
    _appearing_during_the_conversion(monkeypatch, lambda: report.write_text("mine"))
    with pytest.raises(ConvertError, match="quant_report.json: appeared while converting .* the model is at "
                                           ".*o.safetensors, without its report"):
        convert(src, dst, progress=False)
    assert report.read_text() == "mine"
    _assert_tensors(_read(dst)[0], _expected(i2v_weights, I2V, "fp8"))


def test_a_second_conversion_to_the_same_output_is_refused(tmp_path, i2v_weights):
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    with work_folder(dst):  # a conversion to dst is running
        with pytest.raises(ConvertError, match="another conversion to this output is running"):
            convert(src, dst, progress=False)
        convert(src, tmp_path / "other.safetensors", progress=False)
    assert not dst.exists()
    convert(src, dst, progress=False)


def test_what_a_killed_conversion_left_is_removed_by_the_next(tmp_path, i2v_weights):
    src, dst = _source(tmp_path, i2v_weights, I2V), tmp_path / "o.safetensors"
    left = work_folder_path(dst)  # as SIGKILL leaves it: no process holds its lock
    (left / "model").mkdir(parents=True)
    (left / "model" / "block_0.safetensors").write_bytes(b"x" * 1000)
    (left / "lock").touch()
    convert(src, dst, progress=False)
    assert not left.exists() and not [n for n in _listing(tmp_path) if n.startswith(".")]


def test_a_long_output_name(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    for per_block in (False, True):  # at the 255-byte limit of a file name, with the report's suffix
        dst = tmp_path / ("a" * (255 - len(".quant_report.json") - len(".safetensors")) + ".safetensors")
        convert(src, dst, per_block=per_block, force=per_block, progress=False)
        assert dst.exists()


def test_a_float64_weight_past_float32_names_the_cast(tmp_path, i2v_weights):
    weights = {k: v.double() for k, v in i2v_weights.items()}
    weights["blocks.0.self_attn.k.weight"][0, 0] = 1e300
    src = _source(tmp_path, weights, I2V)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.self_attn\.k\.weight' is finite in the file but not "
                                              r"after the cast to torch\.float32"):
        convert(src, tmp_path / "o.safetensors", progress=False)


def test_keep_patterns_that_say_nothing_are_refused(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    with pytest.raises(ConvertError, match="scheme 'bf16' quantizes none"):
        convert(src, tmp_path / "o.safetensors", scheme="bf16", keep=["blocks.0.*"], progress=False)
    with pytest.raises(ConvertError, match="keeps every block linear, so nothing would be fp8"):
        convert(src, tmp_path / "o.safetensors", keep=["*"], progress=False)
    result = convert(src, tmp_path / "o.safetensors", keep="blocks.0.*", progress=False)  # one pattern
    assert not any(e.layer.startswith("blocks.0.") for e in result.layers) and result.layers
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.")) == [
        "o.safetensors", "o.safetensors.quant_report.json"]


def test_a_failed_replacement_keeps_the_old_report_and_an_interrupted_one_leaves_none_stale(
        tmp_path, i2v_weights, monkeypatch):
    convert_module = importlib.import_module("dit8.converters.convert")  # (the package exports the function)
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "o.safetensors"
    report = tmp_path / "o.safetensors.quant_report.json"
    convert(src, dst, scheme="int8", progress=False)
    old_model, old_report = dst.read_bytes(), report.read_text()
    real_replace = os.replace

    def failing_model_rename(a, b):
        if Path(b) == dst:
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(convert_module.os, "replace", failing_model_rename)
    with pytest.raises(ConvertError, match="No space left on device"):
        convert(src, dst, scheme="fp8", force=True, progress=False)
    assert dst.read_bytes() == old_model and report.read_text() == old_report

    def interrupted_report_rename(a, b):
        if Path(b) == report and "int8" not in Path(a).name:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(convert_module.os, "replace", interrupted_report_rename)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, scheme="fp8", force=True, progress=False)
    monkeypatch.undo()
    assert dst.read_bytes() != old_model and not report.exists()  # the new model, and no stale report
    assert not [n for n in _listing(tmp_path) if n.startswith(".")]


def test_bad_requests(tmp_path, i2v_weights, monkeypatch):
    src = _source(tmp_path, i2v_weights, I2V)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for name in (".", "..", "x/.."):
        with pytest.raises(ConvertError, match="give the output's own name"):
            convert(src, Path(name), per_block=True, force=True, progress=False)
    for kwargs, match in [(dict(scheme="int4"), "unknown scheme"), (dict(out_dtype=torch.int8), "out_dtype"),
                          (dict(scheme="bf16", out_dtype=torch.float32), "conflicts")]:
        with pytest.raises(ConvertError, match=match):
            convert(src, tmp_path / "o.safetensors", progress=False, **kwargs)
    with pytest.raises(ConvertError, match="must end in .safetensors"):
        convert(src, tmp_path / "o.bin", progress=False)
    with pytest.raises(ConvertError, match=f"{tmp_path / 'nope'}: the output folder does not exist"):
        convert(src, tmp_path / "nope" / "o.safetensors", progress=False)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConvertError, match=f"{tmp_path / 'file'}: the output folder is a file, not a folder"):
        convert(src, tmp_path / "file" / "o.safetensors", progress=False)
    with pytest.raises(ConvertError, match="must not be, contain or lie inside"):
        convert(src, src, force=True, progress=False)
    with pytest.raises(ConvertError, match="must not be, contain or lie inside"):
        convert(src, src.parent, per_block=True, force=True, progress=False)
    assert src.is_file()
    # A LoRA is read to the end as the source is: replacing it would destroy an input.
    lora = tmp_path / "l.safetensors"
    save_file({"blocks.0.self_attn.q.diff": torch.zeros(I2V.dim, I2V.dim)}, str(lora))
    with pytest.raises(ConvertError, match=f"{lora}: the output must not be, contain or lie inside the LoRA {lora}$"):
        convert(src, lora, lora=[f"{lora}:0.5"], force=True, progress=False)
    assert set(_read(lora)[0]) == {"blocks.0.self_attn.q.diff"}
    # A converted (quantized) file is not a source.
    convert(src, tmp_path / "q.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(tmp_path / "q.safetensors", tmp_path / "qq.safetensors", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(force="no"), "force must be True or False, got 'no'"),
    (dict(per_block="no"), "per_block must be True or False, got 'no'"),
    (dict(per_block=1), "per_block must be True or False, got 1"),
    (dict(report="no"), "report must be True or False, got 'no'"),
    (dict(progress="yes"), "progress must be True, False or None, got 'yes'"),
])
def test_switches_are_booleans(tmp_path, i2v_weights, kwargs, message):
    # A string is truthy: force="no" replaced the existing output, per_block="no" wrote a folder.
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match=f"^{message}$"):
        convert(src, dst, **{"progress": False, **kwargs})
    assert dst.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.parent.name, dst.name])  # nothing else


@pytest.mark.parametrize("kwargs, message", [
    (dict(src=5), "src must be a path \\(str or os.PathLike\\), got int"),
    (dict(src=None), "src must be a path \\(str or os.PathLike\\), got NoneType"),
    (dict(dst=b"o.safetensors"), "dst must be a path \\(str or os.PathLike\\), got bytes"),
    (dict(keep=5), "keep must be an fnmatch pattern \\(str\\) or a sequence of them, got int"),
    (dict(keep=b"blocks.*"), "keep must be an fnmatch pattern \\(str\\) or a sequence of them, got bytes"),
    (dict(lora=5), "lora must be a LoRA \\(a path, \"path:strength\" or a LoraSpec\\) or a sequence of LoRAs, got int"),
    (dict(lora=0), "lora must be a LoRA .* got int"),  # was no LoRA at all
    (dict(lora=b"l.safetensors"), "lora must be a LoRA .* got bytes"),
])
def test_arguments_of_another_type_are_refused_by_name(tmp_path, i2v_weights, kwargs, message):
    # They failed in Path() or list() with a TypeError naming no argument.
    src = _source(tmp_path, i2v_weights, I2V)
    dst = tmp_path / "o.safetensors"
    with pytest.raises(ConvertError, match=f"^{message}$"):
        convert(**{"src": src, "dst": dst, "progress": False, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.parent.name]  # nothing written


@pytest.mark.parametrize("form", ["comfyui_fp8", "comfyui_fp8_unprefixed", "lightx2v_int8_per_block", "dit8_fp8",
                                  "fp8_unscaled"])
def test_an_8bit_source_names_its_format_and_its_readers(tmp_path, i2v_weights, form, capsys, monkeypatch):
    """An 8-bit checkpoint given to convert says which format it is in, what convert takes instead, and what
    reads it as it is; the command exits with 1 and leaves nothing."""
    from test_quantized_loading import comfyui_weights, lightx2v_weights

    if form.startswith("comfyui"):
        stored = comfyui_weights(i2v_weights, I2V)[0]
        if form.endswith("unprefixed"):
            stored = {k.removeprefix("model.diffusion_model."): v for k, v in stored.items()}
        src, kind, dtype = tmp_path / "comfy.safetensors", "ComfyUI's scaled fp8 format", "float8_e4m3fn"
        save_file(stored, str(src))
    elif form == "lightx2v_int8_per_block":
        src = write_checkpoint(lightx2v_weights(i2v_weights, I2V, "int8"), tmp_path / "lx", fmt="per_block")
        kind, dtype = "LightX2V's 8-bit format", "int8"
    elif form == "fp8_unscaled":
        stored = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v
                  for k, v in i2v_weights.items()}
        src = write_checkpoint(stored, tmp_path / "cast.safetensors")
        kind, dtype = "an fp8 cast without scales", "float8_e4m3fn"
    else:
        src, kind, dtype = tmp_path / "packed.safetensors", "a dit8 packed file", "float8_e4m3fn"
        convert(_source(tmp_path, i2v_weights, I2V), src, report=False, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    from dit8.checkpoint import Checkpoint
    from dit8.cli import main

    closed = []
    close = Checkpoint.close
    monkeypatch.setattr(Checkpoint, "close", lambda self: (closed.append(self), close(self)))
    assert main(["convert", str(src), str(out / "o.safetensors"), "--scheme", "int8"]) == 1
    assert closed, "the refused source was left open"
    err = capsys.readouterr().err.strip()
    scaled = "" if form == "fp8_unscaled" else " with a scale"
    assert re.fullmatch(rf"dit8: error: {re.escape(str(src))}: already quantized \({re.escape(kind)}: "
                        rf"'\S*blocks\.\d+\.\S+\.weight' is {dtype}{scaled}\); convert reads float checkpoints "
                        r"\(fp32/bf16/fp16/fp64\), so convert the float release instead\. load_dit and "
                        r"`dit8 generate --dit` read it as it is", err), err
    assert _listing(out) == []
    dit8.load_dit(src)  # as the message says


def _bad_source(tmp_path, weights, problem) -> tuple[Path, str]:
    weights = dict(weights)
    if problem == "nan":
        weights["blocks.1.ffn.2.weight"] = weights["blocks.1.ffn.2.weight"].clone()
        weights["blocks.1.ffn.2.weight"][3, 4] = float("nan")
        src = _source(tmp_path, weights, I2V)
        return src, f"{src}: tensor 'blocks.1.ffn.2.weight' contains NaN"
    if problem == "missing":
        del weights["blocks.0.norm3.bias"]
        return _source(tmp_path, weights, I2V), "'blocks.0.norm3.bias'"
    src = _source(tmp_path, weights, I2V)
    with src.open("r+b") as f:  # truncated download
        f.truncate(src.stat().st_size - 1000)
    return src, f"{src}: truncated"


@pytest.mark.parametrize("problem", ["nan", "missing", "truncated"])
@pytest.mark.parametrize("per_block", [False, True])
def test_bad_source_leaves_nothing(tmp_path, i2v_weights, problem, per_block):
    src, message = _bad_source(tmp_path, i2v_weights, problem)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        convert(src, out / ("o" if per_block else "o.safetensors"), per_block=per_block, progress=False)
    assert _listing(out) == []



@pytest.mark.parametrize("dtype", [torch.float8_e5m2])
def test_a_source_tensor_of_no_float_dtype_convert_reads_is_refused(tmp_path, i2v_weights, dtype):
    # The loader takes any floating dtype outside the linears (integers it refuses itself); convert reads
    # fp32/bf16/fp16/fp64 only: an fp8 bias is no float weight for it to cast to bf16.
    key = "blocks.0.norm3.bias"
    src = _source(tmp_path, {**i2v_weights, key: i2v_weights[key].to(dtype)}, I2V)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(src))}: tensor '{re.escape(key)}' is "
                                              rf"{str(dtype).removeprefix('torch.')}; convert reads float"):
        convert(src, out, progress=False)
    assert not out.exists()


def test_a_lora_given_as_the_source(tmp_path, capsys):
    """`dit8 convert LORA DST` (the LoRA where the base model goes) says what it is and where it goes."""
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(4, I2V.dim),
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(I2V.ffn_dim, 4)}, str(lora))
    out = tmp_path / "out"
    out.mkdir()
    from dit8.cli import main

    assert main(["convert", str(lora), str(out / "o.safetensors")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"dit8: error: {lora}: a LoRA (tensors such as 'diffusion_model.blocks.0.ffn.0.lora_down.weight'), not a "
        f"DiT checkpoint: merge it into its base model with `dit8 convert BASE DST --lora FILE`")
    assert _listing(out) == []


def _on_seventh_weight(monkeypatch, action) -> None:
    """Run `action()` as the converter quantizes its seventh weight, midway through a conversion."""
    real_quantize, calls = convert_module.quantize_weight_measured, [0]

    def quantize(*args):
        calls[0] += 1
        if calls[0] == 7:
            action()
        return real_quantize(*args)

    monkeypatch.setattr(convert_module, "quantize_weight_measured", quantize)


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("failure", ["interrupt", "disk_full"])
def test_failure_midway_leaves_nothing(tmp_path, i2v_weights, monkeypatch, per_block, failure):
    src = _source(tmp_path, i2v_weights, I2V)
    real_write, writes = SafetensorsWriter.write_rows, [0]

    def interrupt():
        raise KeyboardInterrupt

    def write_rows(self, key, rows):
        writes[0] += 1
        if writes[0] == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, key, rows)

    if failure == "interrupt":
        _on_seventh_weight(monkeypatch, interrupt)
    else:
        monkeypatch.setattr(SafetensorsWriter, "write_rows", write_rows)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / ("o" if per_block else "o.safetensors")
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else ConvertError) as err:
        convert(src, dst, per_block=per_block, progress=False)
    if failure != "interrupt":
        assert str(err.value) == (f"{dst}: cannot write the output (No space left on device); nothing was left "
                                  f"behind")
    assert _listing(out) == []


@pytest.mark.parametrize("method", ["readinto", "read"])  # the converted blocks' reads, the digest's
def test_a_source_that_fails_to_read_is_named_not_the_output(tmp_path, i2v_weights, monkeypatch, method):
    src = _source(tmp_path, i2v_weights, I2V)
    real_open = Path.open

    class Failing:
        """The source file, whose reads fail as on a dying disk or a lost network mount."""

        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            if name == method:
                raise OSError(errno.EIO, "Input/output error")
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return Failing(f) if path == src and args[:1] == ("rb",) and failing else f

    class Reader(convert_module.SourceReader):
        def __init__(self, *args):
            super().__init__(*args)
            failing.append(True)  # from here on: the source was validated, the conversion begins

    failing: list[bool] = []
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(convert_module, "SourceReader", Reader)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(src))}: cannot read: Input/output error$"):
        convert(src, out / "o.safetensors", progress=False)
    assert _listing(out) == []


def test_a_lora_that_fails_to_open_is_named_not_the_output(tmp_path, i2v_weights, monkeypatch):
    src = _source(tmp_path, i2v_weights, I2V)
    lora = tmp_path / "l.safetensors"
    save_file({"blocks.1.ffn.0.diff": torch.zeros(I2V.ffn_dim, I2V.dim)}, str(lora))

    class Lora(convert_module.LoraSet):
        def __init__(self, *args):
            super().__init__(*args)
            lora.unlink()  # indexed, not yet read: removed (or its mount lost) while converting

    monkeypatch.setattr(convert_module, "LoraSet", Lora)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(lora))}: cannot read: No such file or directory$"):
        convert(src, out / "o.safetensors", lora=[lora], progress=False)
    assert _listing(out) == []


@pytest.fixture
def sigint_of_a_terminal():
    """Python's own SIGINT handler, which a command started from a terminal has: a test run started in the
    background of a script inherits SIGINT ignored, which the command leaves as it is (as it should)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_of_a_terminal")
@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("stop, status, said", [("SIGTERM", 143, "dit8: terminated"),
                                                ("SIGINT", 130, "dit8: interrupted")])
def test_a_signal_midway_leaves_nothing(tmp_path, i2v_weights, monkeypatch, capsys, per_block, stop, status, said):
    # What a scheduler's or `timeout`'s stop, or Ctrl-C, does to a running `dit8 convert`.
    import signal

    from dit8.cli import main

    src = _source(tmp_path, i2v_weights, I2V)
    _on_seventh_weight(monkeypatch, lambda: os.kill(os.getpid(), getattr(signal, stop)))
    out = tmp_path / "out"
    out.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    args = ["convert", str(src), str(out / ("o" if per_block else "o.safetensors"))] + (["--per-block"] * per_block)
    assert main(args) == status
    assert capsys.readouterr().err.splitlines()[-1] == said
    assert _listing(out) == [] and signal.getsignal(signal.SIGTERM) == before


@pytest.mark.usefixtures("sigint_of_a_terminal")
@pytest.mark.parametrize("first, second", [("SIGINT", "SIGINT"), ("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT")])
def test_a_second_stop_does_not_cut_the_clean_up_short(tmp_path, i2v_weights, monkeypatch, capsys, first, second):
    # Ctrl-C pressed again, or a scheduler's SIGTERM after it, while the work folder is being removed.
    import shutil
    import signal

    import dit8.converters.work_folder as work_folder_module
    from dit8.cli import main

    src = _source(tmp_path, i2v_weights, I2V)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), getattr(signal, second))
        return real_rmtree(path, *args, **kwargs)

    _on_seventh_weight(monkeypatch, lambda: os.kill(os.getpid(), getattr(signal, first)))
    monkeypatch.setattr(work_folder_module.shutil, "rmtree", rmtree)
    out = tmp_path / "out"
    out.mkdir()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    status, said = (130, "dit8: interrupted") if first == "SIGINT" else (143, "dit8: terminated")
    assert main(["convert", str(src), str(out / "o.safetensors")]) == status
    assert capsys.readouterr().err.splitlines()[-1] == said
    assert _listing(out) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---------------------------------------------------------------------------------- format helpers


def test_check_format_version(tmp_path):
    path = tmp_path / "x.safetensors"
    assert check_format_version({}, path) is None  # not a dit8 file
    ok = {fmt.KEY_FORMAT: fmt.FORMAT_NAME, fmt.KEY_FORMAT_VERSION: "1"}
    assert check_format_version(ok, path) == 1
    for meta, match in [({**ok, fmt.KEY_FORMAT_VERSION: "2"}, "version 2 was written by a newer dit8"),
                        ({**ok, fmt.KEY_FORMAT_VERSION: "one"}, "without a valid"),
                        ({**ok, fmt.KEY_FORMAT_VERSION: " 1"}, "without a valid"),  # int() takes these three
                        ({**ok, fmt.KEY_FORMAT_VERSION: "\u0661"}, "without a valid"),  # ARABIC-INDIC DIGIT ONE
                        ({**ok, fmt.KEY_FORMAT_VERSION: "0_1"}, "without a valid"),
                        ({fmt.KEY_FORMAT: fmt.FORMAT_NAME}, "without a valid"),
                        ({**ok, fmt.KEY_FORMAT: "other.packed"}, "unknown checkpoint format"),
                        ({**ok, fmt.KEY_FORMAT_VERSION: "0"}, "unknown dit8.packed version 0")]:
        with pytest.raises(CheckpointError, match=match) as err:
            check_format_version(meta, path)
        assert str(path) in str(err.value)


def test_an_output_name_too_long_for_the_file_system_is_a_convert_error(tmp_path, i2v_weights):
    # Path.exists() raised the OSError (ENAMETOOLONG) out of convert.
    src = write_checkpoint(i2v_weights, tmp_path / "src.safetensors")
    dst = tmp_path / ("x" * 300 + ".safetensors")
    with pytest.raises(ConvertError, match="File name too long") as err:
        convert(src, dst, progress=False)
    assert "x" * 300 in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_quantize_weight_recipe():
    w = torch.tensor([[127.0, 63.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [1e-7, -2e-7, 0.0, 0.0]])
    q, s = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 1)
    assert s[0, 0].item() == 1.0 and q[0].tolist() == [127, 64, 0, 2]  # half to even
    assert s[1, 0].item() == pytest.approx(1e-5 / 127) and q[1].tolist() == [0, 0, 0, 0]
    assert s[2, 0].item() == pytest.approx(1e-5 / 127)  # amax below the 1e-5 floor
    q8, s8 = quantize_weight(w.bfloat16(), "fp8")
    assert q8.dtype == FP8 and s8[0, 0].item() == pytest.approx(127 / 448)
    assert dequantize_weight(q8, s8).dtype == torch.float32
    x = torch.randn(64, 48)
    for scheme in ("fp8", "int8"):
        q, s = quantize_weight(x, scheme)
        err = x.double() - q.double() * s.double()
        rel, sqnr = quantization_error(x, q, s)
        # fp32 differences: ~2^-24·|w| each, about 1e-5 of the quantization noise at most.
        assert rel == pytest.approx((err.norm() / x.double().norm()).item(), rel=1e-5)
        assert sqnr == pytest.approx(-20 * torch.log10(err.norm() / x.double().norm()).item(), rel=1e-6)
        # Weights whose squares pass fp32's range (finite themselves) measure the same.
        huge = x * 1e20
        assert quantization_error(huge, *quantize_weight(huge, scheme))[0] == pytest.approx(rel, rel=1e-5)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize_weight(x, "int4")


@pytest.mark.parametrize("w, scheme, message", [
    (None, "fp8", "the weight w as a torch.Tensor \\[out, in\\], got NoneType"),
    (torch.zeros(3, 4).numpy(), "int8", "the weight w as a torch.Tensor \\[out, in\\], got ndarray"),
    (torch.zeros(3, 0), "fp8", "at least one column \\(in > 0\\), got \\(3, 0\\)"),
    (torch.zeros(3, 0), "int8", "at least one column"),
    (torch.zeros(3, 4), ["fp8"], "unknown quantization scheme \\['fp8'\\]"),
])
def test_quantize_weight_refuses_what_is_no_weight_by_name(w, scheme, message):
    """Not a tensor, no columns to scale a row by, or a scheme that is no name: a ValueError saying which,
    not an AttributeError or IndexError from inside torch."""
    with pytest.raises(ValueError, match=message):
        quantize_weight(w, scheme)
    with pytest.raises(ValueError, match=message):
        convert_module.quantize_weight_measured(w, scheme)


def test_dequantize_weight_and_quantization_error_refuse_mismatched_arguments_by_name():
    w = torch.randn(4, 3)
    q, s = quantize_weight(w, "int8")
    assert torch.equal(dequantize_weight(q, s.reshape(-1)), dequantize_weight(q, s))  # [out] as [out, 1]
    for args, message in [((None, s), "dequantize_weight expects q as a torch.Tensor, got NoneType"),
                          ((q, None), "dequantize_weight expects scale as a torch.Tensor, got NoneType"),
                          ((q, torch.ones(5, 1)), r"scale has shape \(5, 1\), q \(4, 3\) takes \[4, 1\] or \[4\]"),
                          ((q, torch.ones(4, 2)), "scale has shape \\(4, 2\\)"),
                          ((q, s.reshape(1, -1)), "scale has shape \\(1, 4\\)"),
                          # Broadcast, these made a [4, 4] "weight" of a 1-D q.
                          ((q[:, 0], s.reshape(-1)), "expects the codes q as \\[out, in\\], got shape \\(4,\\)")]:
        with pytest.raises(ValueError, match=message):
            dequantize_weight(*args)
    for args, message in [((None, q, s), "quantization_error expects w as a torch.Tensor, got NoneType"),
                          ((w, q.numpy(), s), "expects q as a torch.Tensor, got ndarray"),
                          ((torch.randn(4, 4), q, s), "the weight w has shape \\(4, 4\\), its codes q \\(4, 3\\)"),
                          ((torch.randn(5, 3), q, s), "the weight w has shape \\(5, 3\\)"),
                          ((w, q, torch.ones(2, 1)), "quantization_error: scale has shape \\(2, 1\\)")]:
        with pytest.raises(ValueError, match=message):
            quantization_error(*args)


def _e4m3_nearest(y: torch.Tensor) -> torch.Tensor:
    """Round float64 `y` (|y| <= 448) to the nearest e4m3fn value, ties to the even code, by search over
    the format's 254 finite values: independent of any cast."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F]  # NaN
    values = codes.to(torch.uint8).view(FP8).double()
    dist = (y.reshape(-1, 1) - values).abs()
    best = dist.min(dim=1, keepdim=True).values
    # Among the closest values (two at a tie), the one whose code is even (mantissa's last bit clear).
    tie_break = torch.where(dist == best, (codes & 1).double(), math.inf)
    return values[tie_break.argmin(dim=1)].reshape(y.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_follows_the_spec_formulas(dtype):
    """spec/quant-formats.md, computed here without the converter's code: per output channel (row)
    scale = max(amax_row, 1e-5) / qmax in fp32 (127 int8, 448 e4m3fn); int8 q = clamp(round(w / scale),
    -128, 127) with ties to even, so symmetric in ±127; fp8 q = the e4m3fn value nearest w / scale."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=gen) * torch.logspace(-6, 2, 40)[:, None]
    w[3] = 0  # an all-zero row: the floor keeps its scale finite and its codes zero
    w[4, :4] = torch.tensor([448.0, 1.0625, -1.1875, 0.5 + 2.0 ** -5])  # amax 448 (scale 1): e4m3 ties
    w[4, 4:] = 0
    w[5, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # int8 ties at scale 1
    w[5, 4:] = 0
    w = w.to(dtype)
    w32 = w.float()
    for scheme, qmax in (("int8", 127.0), ("fp8", 448.0)):
        q, s = quantize_weight(w, scheme)
        assert q.shape == w.shape and s.shape == (w.shape[0], 1) and s.dtype == torch.float32
        amax = w32.abs().amax(dim=1, keepdim=True)
        assert torch.equal(s, torch.maximum(amax, torch.tensor(1e-5)) / torch.tensor(qmax))
        y = (w32 / s).double()
        if scheme == "int8":
            assert q.dtype == torch.int8
            assert torch.equal(q.double(), torch.round(y).clamp(-128, 127))  # torch.round: half to even
            assert q.abs().max() == 127 and q.min() >= -127  # symmetric: -128 is never used
        else:
            assert q.dtype == FP8
            assert torch.equal(q.double(), _e4m3_nearest(y.clamp(-448, 448)))
            assert q.double().abs().max() == 448 and not torch.isnan(q.double()).any()
    assert quantize_weight(w, "int8")[0][5, :4].tolist() == [127, 2, -4, 0]
    assert quantize_weight(w, "fp8")[0][4, :4].double().tolist() == [448.0, 1.0, -1.25, 0.5]
    assert (quantize_weight(w, "fp8")[0][3].double() == 0).all()


def test_the_spec_quantizes_the_twelve_block_linears():
    """spec/quant-formats.md names the linears LightX2V quantizes per block; T2V blocks lack k_img/v_img."""
    twelve = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
              "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"}
    assert set(block_linears(I2V)) == twelve
    assert set(block_linears(T2V)) == twelve - {"cross_attn.k_img", "cross_attn.v_img"}


def test_measured_quantization_is_quantize_weight_and_its_error(monkeypatch):
    """What convert runs (codes, scales and error sums in one pass) is quantize_weight's codes and scales,
    with the sums of error_sums, which are float64's to within the fp32 differences."""
    from dit8.converters import quantize_weights
    from dit8.converters.quantize_weights import _decoded, error_sums, quantize_weight_measured

    x = torch.randn(37, 300) * torch.rand(37, 1) * 3
    for scheme in ("fp8", "int8"):
        q, s, (signal, noise) = quantize_weight_measured(x.bfloat16(), scheme)
        q_ref, s_ref = quantize_weight(x.bfloat16(), scheme)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        # For fp8 the measured pass takes the values the codes rounded, clamped to ±448: a row's largest
        # value, amax / scale, can round to one fp32 ulp above 448. That ulp (2^-23 of the value at most)
        # and the fp32 norms' rounding of inputs that differ bound the sums' difference by a few ulps.
        assert (signal, noise) == pytest.approx(error_sums(x.bfloat16(), q_ref, s_ref), rel=2**-21)
        w = x.bfloat16().double()
        assert signal == pytest.approx(w.square().sum().item(), rel=1e-5)
        assert noise == pytest.approx((w - q.double() * s.double()).square().sum().item(), rel=1e-5)
    # The look-up tables decode every code, and every pair of codes, as the cast does; odd counts and
    # shapes included, in one chunk of pairs and in several.
    single = torch.arange(256, dtype=torch.uint8).view(FP8)
    pairs = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.uint8).view(FP8)
    for chunk in (None, 1000):
        if chunk:
            monkeypatch.setattr(quantize_weights, "_PAIRS_PER_CHUNK", chunk)
        for codes in (single, pairs, pairs.reshape(512, 256), pairs.reshape(256, 512)[:, 1:], pairs[1:-1],
                      single[:255], single[7]):
            decoded = _decoded(codes)
            assert decoded.shape == codes.shape and decoded.dtype == torch.float32
            torch.testing.assert_close(decoded, codes.float(), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------- the writer


def test_writer_reads_back_bit_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen), "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f16": torch.randn(2, 3, 4, generator=gen).half(), "fp8": torch.randn(4, 4, generator=gen).to(FP8),
        "i8": torch.randint(-128, 128, (5, 2), generator=gen, dtype=torch.int8), "scalar": torch.tensor(3.5),
        "i64": torch.arange(3), "empty": torch.zeros(0, 3), "big": torch.randn(100, 33, generator=gen),
    }
    path = tmp_path / "w.safetensors"
    meta = {"a": "1", "dit8.x": json.dumps({"k": [1, 2]})}
    with SafetensorsWriter(path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], meta) as w:
        for key, t in tensors.items():
            if key == "big":  # streamed in uneven row blocks
                for start in range(0, 100, 30):
                    w.write_rows(key, t[start:start + 30])
            else:
                w.write(key, t)
        assert not path.exists()  # only renamed into place on close
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        for key, t in tensors.items():
            assert _same(f.get_tensor(key), t), key
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # data 8-byte aligned
    header = json.loads(raw[8:8 + n])
    order = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in order if tensors[k].numel()] == [k for k in tensors if tensors[k].numel()]
    assert len(raw) == 8 + n + sum(t.nbytes for t in tensors.values())
    assert _listing(tmp_path) == ["w.safetensors"]


def test_writer_checks_and_cleans_up(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"previous")
    cases = [
        (lambda w: w.write("b", torch.zeros(4, dtype=torch.bfloat16)), "'a' comes next"),
        (lambda w: w.write("a", torch.zeros(2, 3, dtype=torch.float64)), "dtype"),
        (lambda w: w.write("a", torch.zeros(3, 2)), "shape"),
        (lambda w: [w.write_rows("a", torch.zeros(2, 3)), w.write_rows("b", torch.zeros(5, dtype=torch.bfloat16))],
         "more data"),
        (lambda w: w.write_rows("a", torch.zeros(1, 3)), "were not written"),  # close() finds 'a' unfinished
        (lambda w: w.update_metadata("m", "a much longer value than before" * 4), "header length"),
    ]
    for action, match in cases:
        with pytest.raises(ValueError, match=match):
            with SafetensorsWriter(path, specs, {"m": "x"}) as w:
                action(w)
        assert path.read_bytes() == b"previous"
        assert _listing(tmp_path) == ["w.safetensors"]
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, specs) as w:
            w.write("a", torch.zeros(2, 3))
            raise RuntimeError("boom")
    assert _listing(tmp_path) == ["w.safetensors"] and path.read_bytes() == b"previous"
    with pytest.raises(ValueError, match="repeated"):
        SafetensorsWriter(path, specs + specs[:1])
    with SafetensorsWriter(path, specs, {"m": "x"}) as w:  # same-length metadata update lands
        w.write("a", torch.ones(2, 3))
        w.write("b", torch.ones(4, dtype=torch.bfloat16))
        w.update_metadata("m", "y")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"m": "y"}
    with pytest.raises(ValueError, match="the writer is closed"):
        w.write("a", torch.ones(2, 3))


def test_writer_refuses_what_the_file_could_not_say(tmp_path):
    # Each misuse is named as such, before anything is written: none is left to a shape error, an
    # IndexError or a file that reads back other than written.
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    path = tmp_path / "w.safetensors"
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    cases = [
        (lambda w: [w.write_rows("a", torch.zeros(1, 3)), w.write("a", torch.zeros(2, 3))], "'a'.* written whole"),
        (lambda w: [w.write("a", torch.zeros(2, 3)), w.write_rows("b", one)], r"rows of tensor 'b' have shape \(\)"),
        (lambda w: [w.write("a", torch.zeros(2, 3)), w.write("b", torch.zeros(4, dtype=torch.bfloat16)),
                    w.write("c", torch.zeros(1))], "'c' written after the last declared tensor"),
    ]
    for action, match in cases:
        with pytest.raises(ValueError, match=match):
            with SafetensorsWriter(path, specs) as w:
                action(w)
        assert _listing(tmp_path) == []
    for specs, metadata, match in [([TensorSpec("__metadata__", (1,), torch.float32)], {}, "reserved"),
                                   (specs, {"m": 1}, "metadata must map strings to strings; 'm': 1")]:
        with pytest.raises(ValueError, match=match):
            SafetensorsWriter(path, specs, metadata)
    assert _listing(tmp_path) == []


def test_written_files_take_the_permissions_the_umask_gives(tmp_path):
    # As any file the user creates: a converted model in a shared folder is readable by the group.
    old = os.umask(0o022)
    try:
        with SafetensorsWriter(tmp_path / "w.safetensors", [TensorSpec("a", (1,), torch.float32)]) as w:
            w.write("a", torch.zeros(1))
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_write_json_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    from dit8.converters.safetensors_writer import write_json

    path = tmp_path / "r.json"
    path.write_text("previous")

    def refuse(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"a": 1})
    assert _listing(tmp_path) == ["r.json"] and path.read_text() == "previous"


# ------------------------------------------------------------------------------------------ CLI


def test_cli_convert_prints_summary(tmp_path, i2v_weights, capsys):
    src = _source(tmp_path, i2v_weights, I2V)
    w = i2v_weights["blocks.0.ffn.0.weight"]
    up, down = _low_rank(*w.shape, 2, seed=0)
    save_file({"diffusion_model.blocks.0.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.0.ffn.0.lora_down.weight": down}, str(tmp_path / "l.safetensors"))
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    dst = tmp_path / "cli_out"
    args = parser.parse_args([str(src), str(dst), "--scheme", "int8", "--keep", "blocks.0.*",
                              "--lora", f"{tmp_path / 'l.safetensors'}:0.5", "--per-block"])
    stream = io.StringIO()
    assert run_convert(args, stream) == 0
    assert capsys.readouterr().err.startswith("converting [")  # the command's bar, in a log too
    text = stream.getvalue()
    assert str(dst) in text and "MiB/s" in text and "mean relative error" in text
    assert text.count("  blocks.1.") == 5  # the five worst layers (block 0 is kept)
    meta = _read(dst)[1]
    assert json.loads(meta[fmt.KEY_LORA]) == [{"file": "l.safetensors", "strength": 0.5}]
    defaults = parser.parse_args(["a", "b.safetensors"])
    assert (defaults.scheme, defaults.lora, defaults.keep, defaults.per_block, defaults.force, defaults.report) == \
        ("fp8", [], [], False, False, True)
    convert(src, tmp_path / "p.safetensors", progress=True)
    assert "converting" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- memory

# The child reports the peak resident set of its own address space (VmHWM, KiB). Not ru_maxrss:
# Linux carries the parent's high-water mark across fork/exec into the child's ru_maxrss (and so into
# RUSAGE_CHILDREN), which here would measure the test process generating the weights.
_MEASURE = textwrap.dedent("""
    import sys
    from dit8.converters import convert
    convert(sys.argv[1], sys.argv[2], scheme="fp8", progress=False)
    status = open("/proc/self/status").read()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
""")


@pytest.mark.slow  # two subprocesses importing torch and ~300 MB of generated checkpoints (~6 s)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    peaks, sizes = [], []
    for layers in (2, 14):
        config = tiny_config("i2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=layers)
        src = write_checkpoint(random_weights(config, seed=layers), tmp_path / f"m{layers}.safetensors")
        sizes.append(src.stat().st_size)
        # A fresh process per size, reporting its own peak: the parent's memory does not count.
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / f"o{layers}.safetensors")],
                             capture_output=True, text=True, check=True)
        peaks.append(int(run.stdout.split()[-1]) * 1024)
    grown, extra_source = peaks[1] - peaks[0], sizes[1] - sizes[0]
    assert extra_source > 200 << 20
    # Reading through memory maps would grow the peak by the whole extra source (~220 MiB); streaming
    # keeps it flat up to allocator noise (measured: +-30 MiB between identical runs).
    assert grown < extra_source / 5, f"peak RSS grew by {grown >> 20} MiB for {extra_source >> 20} MiB more model"


def test_fp16_overflow_is_an_error_not_inf(tmp_path, i2v_weights):
    # Finite in the fp32 file, beyond fp16's 65504: the cast would store inf.
    weights = dict(i2v_weights)
    weights["blocks.0.norm3.bias"] = weights["blocks.0.norm3.bias"].clone()
    weights["blocks.0.norm3.bias"][2] = 1e5
    src, out = _source(tmp_path, weights, I2V), tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.norm3\.bias' is finite in the file but not after "
                                              r"the cast to torch\.float16 \(largest finite value 6\.55e\+04\)"):
        convert(src, out / "o.safetensors", out_dtype=torch.float16, progress=False)
    assert _listing(out) == []


def test_a_lora_that_overflows_a_quantized_layer_is_named(tmp_path, i2v_weights):
    src = _source(tmp_path, i2v_weights, I2V)
    shape = i2v_weights["blocks.0.ffn.0.weight"].shape
    lora = tmp_path / "huge.safetensors"
    save_file({"blocks.0.ffn.0.diff": torch.full(shape, 3e38)}, str(lora))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as err:
        convert(src, out / "o.safetensors", lora=[(lora, 2.0)], progress=False)
    assert str(err.value).endswith(f"'blocks.0.ffn.0.weight' is finite in the file but not after merging the LoRA "
                                   f"{lora}")
    assert _listing(out) == []


def test_lora_arguments_of_every_documented_form(tmp_path, i2v_weights):
    """convert(lora=...) takes one path or LoraSpec, or a sequence of paths, "path:strength" strings,
    (path, strength) pairs and LoraSpecs; a malformed pair is a CheckpointError."""
    src = _source(tmp_path, i2v_weights, I2V)
    w = i2v_weights["blocks.0.self_attn.q.weight"]
    up, down = _low_rank(*w.shape, 2, seed=4)
    path = tmp_path / "l.safetensors"
    save_file({"blocks.0.self_attn.q.diff": up @ down}, str(path))
    for i, lora in enumerate([path, LoraSpec(path, 0.5), [(path, 0.5)], (f"{path}:0.5",), [LoraSpec(path)]]):
        got = _convert_fp32(tmp_path, src, lora, name=f"o{i}.safetensors")
        strength = 1.0 if i in (0, 4) else 0.5
        assert _same(got["blocks.0.self_attn.q.weight"], w.float() + (up @ down) * strength), lora
    for bad in [(path, "oops"), (path, 0.5, 1)]:
        with pytest.raises(CheckpointError, match="a LoRA given as a tuple must be \\(path, strength\\)"):
            parse_lora(bad)
