"""The CUDA extension builds, links and imports (CI does this on its CPU machine with nvcc), its kernels
spill no registers, its argument checks work without a GPU, and the "cuda" backend stands aside where it
cannot run.

The build here targets one architecture (sm_90a, or $DIT8_TEST_CUDA_ARCHS) to keep CI short; the full
ahead-of-time build is `python -m dit8.kernels.cuda_ext build` (sm_80, sm_89, sm_90a + compute_90 PTX).
Skipped, with the reason, where nvcc, ninja or pybind11 are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit8.kernels import cuda_ext

MISSING = cuda_ext.missing_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason="cannot build the CUDA extension here: missing "
                                 + ", ".join(MISSING))
ARCHS = cuda_ext.parse_archs(os.environ.get("DIT8_TEST_CUDA_ARCHS", "90a"))


@pytest.fixture(scope="module")
def module():
    """Build (ninja skips an up-to-date build in the cache folder) and import the module."""
    if MISSING:
        pytest.skip("cannot build the CUDA extension here: missing " + ", ".join(MISSING))
    path = cuda_ext.build(ARCHS)
    return cuda_ext._import(path)


def test_sources_and_build_description_are_present():
    src = cuda_ext.source_dir()
    for name in cuda_ext.SOURCES:
        assert (src / name).is_file(), name
    text = (src / "build.ninja").read_text()
    for obj in ("quantize.o", "norms.o", "qk_norm_rope.o", "bindings.o"):
        assert f"build {obj}:" in text
    assert "-cudart static" in text and "--use_fast_math" not in text.replace("No --use_fast_math", "")


def test_gencode_flags():
    assert cuda_ext.parse_archs("sm_80; 89,90a") == ("80", "89", "90a")
    flags = cuda_ext.gencode_flags(cuda_ext.DEFAULT_ARCHS)
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    assert cuda_ext.gencode_flags(("90a",)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(cuda_ext.CudaExtError, match="bad CUDA architecture"):
        cuda_ext.parse_archs("hopper")
    assert cuda_ext.parse_archs("90a,sm_90a, 89") == ("90a", "89")  # each once: one cache tag, no repeated flags


@pytest.mark.parametrize("text, message", [
    ("90aa", "bad CUDA architecture '90aa'"), ("0", "bad CUDA architecture '0'"),
    ("\u0661\u0662", "bad CUDA architecture"), (",", "no CUDA architecture in ','"), (" ; ", "no CUDA architecture")])
def test_what_is_not_an_architecture_is_refused_naming_where_it_came_from(monkeypatch, text, message):
    """A value nvcc would fail on minutes later (leaving a failed build), or none (nvcc's own default
    target, unrecorded), is refused at once, naming the variable."""
    monkeypatch.setenv("DIT8_CUDA_ARCHS", text)
    with pytest.raises(cuda_ext.CudaExtError, match=f"^DIT8_CUDA_ARCHS: {message}"):
        cuda_ext.default_archs()


def test_the_cache_variable_is_expanded_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIT8_CACHE", "~/dit8cache")
    assert cuda_ext.cache_root() == tmp_path / "dit8cache"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DIT8_CACHE", str(tmp_path / "file"))
    with pytest.raises(cuda_ext.CudaExtError, match=f"^DIT8_CACHE='{tmp_path / 'file'}': not a folder$"):
        cuda_ext.cache_root()


def test_a_compiler_with_a_launcher_or_flags_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "ccache g++")
    assert "a C++ compiler: CXX='ccache g++' must name one executable, without a launcher or flags" in \
        cuda_ext.missing_tools()


@needs_tools
def test_module_builds_links_and_imports_without_a_gpu(module):
    assert module.ABI_VERSION == cuda_ext.ABI_VERSION
    assert module.ARCHS == ",".join("sm_" + a for a in ARCHS)
    assert module.MAX_THREADS == cuda_ext.MAX_THREADS and module.QK_MAX_THREADS == cuda_ext.QK_MAX_THREADS
    assert module.QK_VECS_PER_THREAD == cuda_ext.QK_VECS_PER_THREAD
    assert callable(module.rows) and callable(module.qk_norm_rope)
    path = cuda_ext.module_path(ARCHS)
    # cudart is linked statically: the module needs no libcudart of any version, only the driver.
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
        assert "libcudart" not in needed and "libtorch" not in needed and "libc10" not in needed
    # A second build is a no-op for ninja.
    start = path.stat().st_mtime_ns
    cuda_ext.build(ARCHS)
    assert path.stat().st_mtime_ns == start


@needs_tools
def test_a_module_damaged_after_its_build_is_refused_or_linked_again(module, monkeypatch, tmp_path):
    built = cuda_ext.build_dir(ARCHS)
    monkeypatch.setenv("DIT8_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.setattr(cuda_ext, "default_archs", lambda: ARCHS)
    shutil.copytree(built, cuda_ext.build_dir(ARCHS))  # (copies keep their times: ninja has nothing to do)
    path = cuda_ext.module_path(ARCHS)
    whole = path.read_bytes()
    assert cuda_ext._checksum_path(path).read_text().strip() == cuda_ext._digest(path)
    path.write_bytes(whole[: len(whole) // 2])  # importing this would crash the process
    with monkeypatch.context() as no_tools:
        no_tools.setattr(cuda_ext, "missing_tools", lambda: ["nvcc (the CUDA toolkit; set CUDA_HOME)"])
        with pytest.raises(cuda_ext.CudaExtError, match="changed after its build .*build --force"):
            cuda_ext.load()
    # ninja alone would keep it (it is newer than its objects): the build links it again.
    assert cuda_ext.build(ARCHS) == path
    assert len(path.read_bytes()) == len(whole) and not cuda_ext._damaged(path)
    cuda_ext._checksum_path(path).unlink()  # a module without its record is not imported either
    with monkeypatch.context() as no_tools:
        no_tools.setattr(cuda_ext, "missing_tools", lambda: ["nvcc (the CUDA toolkit; set CUDA_HOME)"])
        with pytest.raises(cuda_ext.CudaExtError, match="checksum recorded then, .*sha256, is missing"):
            cuda_ext.load()


@pytest.mark.slow
@pytest.mark.cpu_only  # ptxas's report is the same on any machine with nvcc
@needs_tools
@pytest.mark.parametrize("source", [n for n in cuda_ext.SOURCES if n.endswith(".cu")])
def test_kernels_do_not_spill_registers(source, tmp_path):
    # ptxas's report for every kernel instantiation of the source, for each architecture built here:
    # a spill is a local-memory round trip in a memory-bound kernel, and the register use decides how
    # many warps an SM keeps resident. Code-generation flags as in csrc/build.ninja. Device code only
    # (-fatbin, which takes several architectures where -cubin takes one): the host compilation of an
    # object file changes nothing ptxas reports and took a third of the time.
    run = subprocess.run([cuda_ext.find_nvcc(), "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage",
                          *cuda_ext.gencode_flags(ARCHS), "-fatbin", str(cuda_ext.source_dir() / source),
                          "-o", str(tmp_path / "kernels.fatbin")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", run.stdout + run.stderr)]
    assert spills and not any(spills), (source, spills)


@needs_tools
def test_a_failed_build_is_not_retried_without_force(tmp_path, monkeypatch):
    # Sources whose build description ninja cannot parse: the build fails at once.
    csrc = tmp_path / "csrc"
    shutil.copytree(cuda_ext.source_dir(), csrc)
    (csrc / "build.ninja").write_text("this is not ninja\n")
    monkeypatch.setenv("DIT8_CSRC", str(csrc))
    monkeypatch.setenv("DIT8_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cuda_ext.CudaExtError, match="failed"):
        cuda_ext.build(ARCHS)
    log = cuda_ext.build_dir(ARCHS) / cuda_ext.FAILED_BUILD_LOG
    assert log.is_file()
    with pytest.raises(cuda_ext.CudaExtError, match="an earlier build of these sources failed.*--force"):
        cuda_ext.build(ARCHS)
    for again in ({"force": True}, {"retry_failed": True}):  # (the build command retries)
        with pytest.raises(cuda_ext.CudaExtError, match="building the CUDA extension .* failed"):
            cuda_ext.build(ARCHS, **again)


def _rows_args(**over):
    args = dict(x=0, x_stride=8, out=0, out_scale=0, weight=0, bias=0, shift=0, scale=0, shift_stride=0,
                scale_stride=0, rows=1, rows_per_batch=1, cols=8, norm=0, act=0, eps=1e-6, in_dtype=2, out_dtype=2,
                vec=8, device=0, stream=0)
    args.update(over)
    return args


@needs_tools
def test_launchers_check_their_arguments_before_touching_the_gpu(module):
    with pytest.raises(ValueError, match="float dtype code"):
        module.rows(**_rows_args(in_dtype=9))
    with pytest.raises(ValueError, match="vec must be 1 or 8"):
        module.rows(**_rows_args(vec=4))
    with pytest.raises(ValueError, match="multiple of vec"):
        module.rows(**_rows_args(cols=12))
    with pytest.raises(ValueError, match="out_scale is needed"):
        module.rows(**_rows_args(out_dtype=3))
    with pytest.raises(ValueError, match="shift and scale go together"):
        module.rows(**_rows_args(shift=64))
    qk = dict(q=0, k=0, q_batch_stride=0, q_token_stride=0, k_batch_stride=0, k_token_stride=0, weight_q=0,
              weight_k=0, cos=0, sin=0, q_out=0, k_out=0, q_scale=0, k_scale=0, batch=1, tokens=1, heads=40,
              head_dim=128, eps=1e-6, in_dtype=2, out_dtype=2, vec=8, device=0, stream=0)
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of vec"):
        module.qk_norm_rope(**{**qk, "head_dim": 12})
    with pytest.raises(ValueError, match="too large for one thread block"):
        module.qk_norm_rope(**{**qk, "heads": 400})
    with pytest.raises(ValueError, match="needed exactly for 8-bit outputs"):
        module.qk_norm_rope(**{**qk, "out_dtype": 4})
    # Nothing to do: no CUDA call at all.
    module.rows(**_rows_args(rows=0))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cudaSetDevice"):
            module.rows(**_rows_args())


def test_cuda_backend_stands_aside_without_a_gpu():
    assert not cuda_ext.cuda_available(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert not cuda_ext.cuda_available(torch.device("cuda"))
        from dit8.kernels import qk_norm_rope  # noqa: F401  (registers its ops)
        from dit8.kernels.registry import available_backends

        assert "cuda" not in available_backends("cuda").get("qk_norm_rope", [])


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DIT8_CUDA_EXT", "0")
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    assert not cuda_ext.cuda_available(torch.device("cuda"))
    with pytest.raises(cuda_ext.CudaExtError, match="disabled"):
        cuda_ext.load()


@pytest.mark.parametrize("value", ["off", "false", "2"])
def test_a_setting_other_than_0_or_1_is_refused(monkeypatch, value):
    # Read as "on", "off" would run the kernels it was set to stop.
    monkeypatch.setenv("DIT8_CUDA_EXT", value)
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for call in (cuda_ext.load, lambda: cuda_ext.unavailable_reason(torch.device("cuda"))):
        with pytest.raises(cuda_ext.CudaExtError, match=f"DIT8_CUDA_EXT='{value}': expected 0 .off. or 1 .on."):
            call()


class _FakeModule:
    ABI_VERSION = cuda_ext.ABI_VERSION
    ARCHS = "sm_80,sm_89,sm_90a"


def _fake_loading(monkeypatch, tmp_path, archs):
    """A private cache, `archs` as this machine's, and imports recorded instead of done."""
    monkeypatch.setenv("DIT8_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    monkeypatch.setattr(cuda_ext, "default_archs", lambda: archs)
    imported = []
    monkeypatch.setattr(cuda_ext, "_import", lambda path: imported.append(path) or _FakeModule)
    return imported


def _touch_module(archs) -> Path:
    path = cuda_ext.module_path(archs)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    cuda_ext._write_checksum(path)
    return path


def test_a_module_built_ahead_of_time_serves_a_gpu_without_build_tools(monkeypatch, tmp_path):
    imported = _fake_loading(monkeypatch, tmp_path, ("90a",))
    monkeypatch.setattr(cuda_ext, "missing_tools", lambda: ["nvcc (the CUDA toolkit; set CUDA_HOME)"])
    with pytest.raises(cuda_ext.CudaExtError, match="missing nvcc"):
        cuda_ext.load()  # nothing built
    default = _touch_module(cuda_ext.DEFAULT_ARCHS)  # the build command's targets, built without a GPU
    assert cuda_ext.load() is _FakeModule and imported == [default]
    monkeypatch.setattr(cuda_ext, "_MODULE", None)
    own = _touch_module(("90a",))  # this GPU's own build comes first
    assert cuda_ext.load() is _FakeModule and imported[-1] == own


def test_a_read_only_cache_serves_the_module_it_holds(monkeypatch, tmp_path):
    imported = _fake_loading(monkeypatch, tmp_path, ("90a",))
    monkeypatch.setattr(cuda_ext, "missing_tools", lambda: [])

    def read_only(archs, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cuda_ext, "build", read_only)
    with pytest.raises(cuda_ext.CudaExtError, match="cannot build the CUDA extension in .*Read-only file system"):
        cuda_ext.load()
    path = _touch_module(("90a",))
    assert cuda_ext.load() is _FakeModule and imported == [path]


def test_a_failed_build_falls_back_to_the_module_built_ahead_of_time(monkeypatch, tmp_path):
    """With the build tools installed, building this GPU's own module may still fail (a read-only cache, a
    toolchain that fails): the default targets' module, built ahead of time, serves."""
    imported = _fake_loading(monkeypatch, tmp_path, ("90a",))
    monkeypatch.setattr(cuda_ext, "missing_tools", lambda: [])
    for error in (OSError(30, "Read-only file system"), cuda_ext.CudaExtError("building ... failed")):
        def failing(archs, error=error, **kwargs):
            raise error

        monkeypatch.setattr(cuda_ext, "build", failing)
        monkeypatch.setattr(cuda_ext, "_MODULE", None)
        with pytest.raises(cuda_ext.CudaExtError):
            cuda_ext.load()
    default = _touch_module(cuda_ext.DEFAULT_ARCHS)
    assert cuda_ext.load() is _FakeModule and imported == [default]


@needs_tools
def test_an_interrupted_build_is_not_recorded_as_a_failed_one(tmp_path, monkeypatch):
    """ninja stopped by a signal (SIGTERM, a hang-up) exits 2: nothing to say about the sources, so the next
    first use builds again. Here a ninja replaced by a script that exits as an interrupted ninja does."""
    fake = tmp_path / "ninja"
    fake.write_text("#!/bin/sh\necho 'ninja: build stopped: interrupted by user.'\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cuda_ext, "find_ninja", lambda: str(fake))
    monkeypatch.setenv("DIT8_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cuda_ext.CudaExtError, match="interrupted by user"):
        cuda_ext.build(ARCHS)
    assert not (cuda_ext.build_dir(ARCHS) / cuda_ext.FAILED_BUILD_LOG).exists()


def test_the_build_lock_is_inherited_by_the_build(tmp_path, monkeypatch):
    """The lock's descriptor goes to ninja (and its compilers): a Python process killed mid-build leaves its
    compilers holding the lock, so a second build waits for them instead of writing the same files."""
    calls = []
    monkeypatch.setattr(cuda_ext.subprocess, "run", lambda cmd, **kwargs: calls.append(kwargs) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setattr(cuda_ext, "find_ninja", lambda: "ninja")
    with cuda_ext._locked(tmp_path) as lock:
        cuda_ext._run_ninja(tmp_path, False, lock)
    assert calls[0]["pass_fds"] == (lock, )


def test_tool_paths_with_spaces_are_quoted(monkeypatch):
    monkeypatch.setattr(cuda_ext, "pybind11_include", lambda: "/opt/py env/pybind11/include")
    assert "pybind11_include = '/opt/py env/pybind11/include'" in cuda_ext._ninja_file(("90a",)).splitlines()


def test_command_line_errors_are_one_line(capsys):
    assert cuda_ext.main(["build", "--archs", "hopper"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --archs: bad CUDA architecture 'hopper'") and err.count("\n") == 1


def test_command_line_info():
    proc = subprocess.run([sys.executable, "-m", "dit8.kernels.cuda_ext", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sources:" in proc.stdout and "missing:" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_tools
def test_cuda_is_listed_first_on_a_gpu():
    from dit8.kernels import norm_quant, qk_norm_rope  # noqa: F401  (registers their ops)
    from dit8.kernels.registry import available_backends

    backends = available_backends("cuda")
    for op in ("quantize_per_token", "gelu_tanh_quant", "layer_norm", "layer_norm_modulate", "rms_norm",
               "layer_norm_modulate_quant", "layer_norm_quant", "qk_norm_rope", "qk_norm_rope_quant"):
        assert backends[op][0] == "cuda", op
