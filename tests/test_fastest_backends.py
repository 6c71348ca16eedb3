"""bench/fastest_backends.py: from benchmark rows to registry.FASTEST entries."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "fastest_backends", Path(__file__).resolve().parent.parent / "bench" / "fastest_backends.py")
_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_MODULE)
fastest = _MODULE.fastest


def _row(name: str, ms: float, **info) -> dict:
    return {"name": name, "extra_info": {"ms": ms, **info}}


def test_fastest_backend_per_op_over_its_cases():
    rows = [
        # A fused op on three backends and two cases: CUDA wins on the total.
        _row("test_fused_op[cuda-rms_bf16]", 1.0, op="rms_norm", backend="cuda"),
        _row("test_fused_op[triton-rms_bf16]", 0.8, op="rms_norm", backend="triton"),
        _row("test_fused_op[torch-rms_bf16]", 5.0, op="rms_norm", backend="torch"),
        _row("test_fused_op[cuda-rms_fp32]", 1.0, op="rms_norm", backend="cuda"),
        _row("test_fused_op[triton-rms_fp32]", 1.4, op="rms_norm", backend="triton"),
        _row("test_fused_op[torch-rms_fp32]", 6.0, op="rms_norm", backend="torch"),
        # bf16 attention: the rows name their case, so the torch reference (SDPA) and the kernel compare.
        _row("test_self_attention[torch_reference]", 38.0, op="attention", backend="torch", case="bf16"),
        _row("test_self_attention[triton_bf16]", 43.8, op="attention", backend="triton", case="bf16"),
        # Rows without an op (the 8-bit paths, the baselines) take no part.
        _row("test_self_attention[triton_fp8]", 35.9, backend="triton"),
        _row("test_self_attention[sdpa_cudnn]", 37.0),
        # A backend that missed one of the op's cases is not compared on a partial total.
        _row("test_fused_op[cuda-ln_bf16]", 0.1, op="layer_norm", backend="cuda"),
        _row("test_fused_op[triton-ln_bf16]", 0.2, op="layer_norm", backend="triton"),
        _row("test_fused_op[triton-ln_fp32]", 0.2, op="layer_norm", backend="triton"),
    ]
    totals, winners = fastest(rows)
    assert winners == {"rms_norm": "cuda", "attention": "torch"}
    assert totals["rms_norm"] == {"cuda": 2.0, "triton": 2.2, "torch": 11.0}
    assert totals["layer_norm"] == {"triton": 0.4}


def test_smoke_results_give_no_entry(tmp_path, capsys):
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"benchmarks": [
        _row("test_fused_op[triton-rms_bf16]", 0.8, op="rms_norm", backend="triton",
             device="cpu (smoke: interpreter, tiny shapes)"),
        _row("test_fused_op[torch-rms_bf16]", 0.1, op="rms_norm", backend="torch",
             device="cpu (smoke: interpreter, tiny shapes)")]}))
    assert _MODULE.main([str(path), "--capability", "9.0"]) == 1
    captured = capsys.readouterr()
    assert "smoke-mode results" in captured.err and "FASTEST" not in captured.out


def test_rows_of_no_registry_backend_take_no_part(tmp_path, capsys):
    # FASTEST names backends the registry has: a row of another (a cuDNN baseline, say) is left out.
    rows = [_row("test_fused_op[cuda-rms_bf16]", 1.0, op="rms_norm", backend="cuda"),
            _row("test_fused_op[triton-rms_bf16]", 2.0, op="rms_norm", backend="triton"),
            _row("test_fused_op[cudnn-rms_bf16]", 0.5, op="rms_norm", backend="cudnn")]
    assert fastest(rows) == ({"rms_norm": {"cuda": 1.0, "triton": 2.0}}, {"rms_norm": "cuda"})
    # Files without such rows give no entry, and say so.
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": [rows[2], _row("test_gemm[fp8]", 3.0)]}))
    assert _MODULE.main([str(path), "--capability", "9.0"]) == 1
    captured = capsys.readouterr()
    assert "no rows with an op and a backend" in captured.err and "FASTEST" not in captured.out


@pytest.mark.parametrize("text", ["9", "9.", ".0", "9.x", "sm90"])
def test_a_capability_that_is_not_major_minor_is_a_usage_error(tmp_path, capsys, text):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit) as exit_:
        _MODULE.main([str(path), "--capability", text])
    assert exit_.value.code == 2
    assert f"--capability must be MAJOR.MINOR, e.g. 9.0, got {text!r}" in capsys.readouterr().err
