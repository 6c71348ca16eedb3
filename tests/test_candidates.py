"""DIT8_GLUON (kernels/candidates.py): what it accepts, and that `scaled_mm` routes calls to a Gluon
candidate only where it is asked for and where the candidate takes the call; elsewhere the Triton
kernels run as before. The routing is checked on the CPU with the candidates' launches replaced by
recorders (the Gluon kernels themselves run on a Hopper GPU only: tests/test_scaled_mm_gluon.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon dialect")

from dit8 import kernels as ops  # noqa: E402
from dit8.kernels import OpArgumentError, candidates, scaled_mm_gluon  # noqa: E402
from dit8.kernels import scaled_mm_triton as gemm  # noqa: E402
from dit8.kernels.buffers import new_output  # noqa: E402
from dit8.kernels.gemm_configs import GemmConfig  # noqa: E402
from dit8.testing import random_w8a8_operands  # noqa: E402

FP8 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_setting_names_candidates_and_their_configurations(monkeypatch):
    monkeypatch.delenv(candidates.ENV_VAR, raising=False)
    assert candidates.chosen() == {}
    monkeypatch.setenv(candidates.ENV_VAR, "gemm_int8 gemm=ws_k256")
    assert candidates.chosen() == {"gemm_int8": "default", "gemm": "ws_k256"}
    # Every configuration it accepts is one the kernels have.
    assert set(candidates.CONFIGURATIONS["gemm"]) == set(scaled_mm_gluon.CANDIDATES)
    assert candidates.CONFIGURATIONS["gemm_fast"] == candidates.CONFIGURATIONS["gemm_int8"] == ("default", )
    for bad, message in [("attention", "unknown candidate 'attention'"),
                         ("gemm=fast", "gemm has no configuration 'fast'")]:
        monkeypatch.setenv(candidates.ENV_VAR, bad)
        with pytest.raises(OpArgumentError, match=f"DIT8_GLUON: {message}"):
            candidates.chosen()


def test_nothing_is_routed_off_hopper(monkeypatch):
    monkeypatch.setenv(candidates.ENV_VAR, "gemm=ws gemm_fast")
    assert candidates.routed("gemm", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert candidates.routed("gemm", torch.device("cuda", 0)) is None
    # Nor on a later generation: the candidates are sm_90 kernels (wgmma), asked for or not.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert candidates.routed("gemm", torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert candidates.routed("gemm", torch.device("cuda", 0)) == "ws"
    assert candidates.routed("gemm_fast", torch.device("cuda", 0)) == "default"


def test_hopper_routes_the_adopted_kernels_unless_the_setting_says_otherwise(monkeypatch):
    monkeypatch.delenv(candidates.ENV_VAR, raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    adopted = candidates.chosen(cuda)
    # Every adopted entry names candidates and configurations the kernels have (_parse refuses others).
    assert all(candidates._parse(setting, "ADOPTED") for setting in candidates.ADOPTED.values())
    assert adopted and adopted == candidates._parse(candidates.ADOPTED[(9, 0)], "ADOPTED")
    assert all(candidates.routed(name, cuda) == config for name, config in adopted.items())
    assert all(candidates.routed(name, cuda) is None for name in set(candidates.CONFIGURATIONS) - set(adopted))
    # Nothing without a device, on the CPU, or on a GPU generation nothing was adopted for.
    assert candidates.chosen() == {} and candidates.routed("gemm", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert candidates.chosen(cuda) == {}
    # DIT8_GLUON replaces them: empty, it routes nothing.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv(candidates.ENV_VAR, "")
    assert candidates.chosen(cuda) == {} and candidates.routed("gemm", cuda) is None
    monkeypatch.setenv(candidates.ENV_VAR, "gemm_fast")
    assert candidates.chosen(cuda) == {"gemm_fast": "default"} and candidates.routed("gemm_int8", cuda) is None


def test_promoted_fp8_gemms_go_to_the_candidate_asked_for(monkeypatch):
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need FP8 tensor cores (sm_89+)")
    # K = 40: rows of 40 bytes, which TMA cannot describe, so the real candidate refuses the call.
    xq, xs, wq, ws = (t.to(DEVICE) for t in random_w8a8_operands(70, 40, 40, FP8, seed=1, bias_dtype=None)[:4])
    promoted = GemmConfig(64, 64, 64, 2, 4, 1, fp8_promote=64)
    monkeypatch.setattr(gemm, "pick_config", lambda kind, M, N, K, device, epilogue="": promoted)
    expected = gemm.launch(xq, xs, wq, ws, None, new_output((70, 40), torch.bfloat16, torch.device(DEVICE)),
                           config=promoted)
    monkeypatch.setattr(candidates, "routed", lambda name, device: "k256" if name == "gemm" else None)
    # Outside its scope the candidate refuses (OpArgumentError), and the Triton kernel runs.
    torch.testing.assert_close(ops.scaled_mm(xq, xs, wq, ws, backend="triton"), expected, rtol=0, atol=0)

    calls = []

    def recorder(xq, x_scale, wq, w_scale, bias, out, *, config, **epilogue):
        calls.append(config)
        return out.zero_()

    monkeypatch.setattr(scaled_mm_gluon, "launch", recorder)
    out = ops.scaled_mm(xq, xs, wq, ws, backend="triton")
    assert calls == [scaled_mm_gluon.CANDIDATES["k256"]] and not out.any()
    # Tiles with the tensor cores' own accumulation go to the fast-accumulation candidate, and only when it
    # is asked for: a promoted kernel is never faster than those tiles.
    monkeypatch.setattr(gemm, "pick_config", lambda kind, M, N, K, device, epilogue="": GemmConfig(64, 64, 64, 2, 4, 1))
    ops.scaled_mm(xq, xs, wq, ws, backend="triton")
    assert len(calls) == 1
    monkeypatch.setattr(candidates, "routed", lambda name, device: "default" if name == "gemm_fast" else None)
    ops.scaled_mm(xq, xs, wq, ws, backend="triton")
    assert calls[1:] == [scaled_mm_gluon.FAST]


def test_the_setting_for_a_results_folder_takes_the_fastest_timed_configurations(tmp_path, monkeypatch):
    """bench/gluon_choice.py: what bench/gpu_check.sh's candidates stage sets DIT8_GLUON to."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gluon_choice", Path(__file__).resolve().parent.parent / "bench" / "gluon_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.choice(tmp_path) == ""  # nothing timed: no candidate
    (tmp_path / "bench_gemm.json").write_text("[]")  # not pytest-benchmark's object: nothing timed either
    assert module.choice(tmp_path) == ""

    def row(test, params, ms, **info):
        return {"name": f"{test}[...]", "params": params, "extra_info": {"ms": ms, **info}}

    promoted, other = [32760, 5120, 13824], [32760, 5120, 5120]
    gemm = [row("test_gemm_gluon", {"config": "default"}, 4.0, shape=promoted, ms_triton=4.9),
            row("test_gemm_gluon", {"config": "k256"}, 3.6, shape=promoted, ms_triton=4.9),
            row("test_gemm_gluon", {"config": "ws"}, 1.0, shape=other, ms_triton=1.6),  # a shape it never takes
            row("test_gemm", {"case": "fp8"}, 0.5, shape=promoted),  # not a candidate
            # The fast-accumulation candidate wins on one shape and loses more on the other: not routed.
            row("test_gemm_gluon_fast", {}, 1.2, shape=other, ms_triton=1.3),
            row("test_gemm_gluon_fast", {}, 3.9, shape=[32760, 13824, 5120], ms_triton=3.6),
            row("test_gemm_gluon_int8", {}, 1.3, shape=other, ms_triton=1.4)]  # the INT8 kernel wins
    (tmp_path / "bench_gemm.json").write_text(json.dumps({"benchmarks": gemm}))
    assert module.choice(tmp_path) == "gemm=k256 gemm_int8=default"
    monkeypatch.setenv(candidates.ENV_VAR, module.choice(tmp_path))  # ... which the ops accept
    assert candidates.chosen() == {"gemm": "k256", "gemm_int8": "default"}
    # A candidate slower than the Triton kernel it would replace is not routed.
    gemm[1]["extra_info"]["ms"] = gemm[0]["extra_info"]["ms"] = 5.0
    (tmp_path / "bench_gemm.json").write_text(json.dumps({"benchmarks": gemm}))
    assert module.choice(tmp_path) == "gemm_int8=default"


def test_int8_gemms_go_to_the_in_place_accumulation_candidate_asked_for(monkeypatch):
    xq, xs, wq, ws = (t.to(DEVICE) for t in random_w8a8_operands(70, 40, 48, torch.int8, seed=2, bias_dtype=None)[:4])
    calls = []

    def recorder(xq, x_scale, wq, w_scale, bias, out, *, config, **epilogue):
        calls.append(config)
        return out.zero_()

    monkeypatch.setattr(scaled_mm_gluon, "launch", recorder)
    monkeypatch.setattr(candidates, "routed", lambda name, device: "default" if name == "gemm_fast" else None)
    ops.scaled_mm(xq, xs, wq, ws, backend="triton")
    assert calls == []  # FP8's fast-accumulation route takes no INT8 call
    monkeypatch.setattr(candidates, "routed", lambda name, device: "default" if name == "gemm_int8" else None)
    assert not ops.scaled_mm(xq, xs, wq, ws, backend="triton").any() and calls == [scaled_mm_gluon.FAST]
