"""What the wheel and the source distribution hold, what the wheel declares (the command, the extras) and
that it runs unpacked on its own, built from this checkout's tracked files with the installed setuptools
(no build isolation: offline, a few seconds)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from dit8.kernels.cuda_ext import SOURCES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"runtime": "dit8", "kernels": "dit8/kernels", "converters": "dit8/converters", "csrc": "dit8/csrc"}

pytest.importorskip("setuptools", minversion="69", reason="the pyproject's build requirement (pip install "
                    "'dit8[test]' installs it)")


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout (and git) to know which files are the project's")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if out.returncode != 0:  # e.g. a checkout git will not read as this user ("dubious ownership")
        pytest.skip(f"git ls-files failed: {out.stderr.decode(errors='replace').strip()[:300]}")
    # (a file deleted in the work tree but not yet in git's index is not part of what gets built)
    return [name for name in out.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory, tracked) -> tuple[Path, Path]:
    """(the wheel, the sdist), built from a copy of the tracked files, so that neither build outputs nor
    untracked files of the checkout take part."""
    tree, dist = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("dist")
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        out = subprocess.run([sys.executable, "-c", f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])",
                              str(dist)], cwd=tree, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    (wheel_path,), (sdist_path,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    return wheel_path, sdist_path


@pytest.fixture(scope="module")
def built(dist) -> tuple[list[str], list[str]]:
    """(the wheel's file names, the sdist's file names below its top folder)."""
    wheel_path, sdist_path = dist
    wheel = zipfile.ZipFile(wheel_path).namelist()
    with tarfile.open(sdist_path) as tar:
        sdist = [m.name.partition("/")[2] for m in tar.getmembers() if m.isfile()]
    return wheel, sdist


def test_the_wheel_holds_the_packages_their_data_and_nothing_else(tracked, built):
    wheel, _ = built
    expected = {f"{PACKAGES[name.partition('/')[0]]}/{name.partition('/')[2]}" for name in tracked
                if name.partition("/")[0] in PACKAGES and "/" in name}
    missing = sorted(expected - set(wheel))
    assert not missing, f"tracked package files missing from the wheel: {missing}"
    # The CUDA extension is built from the installed sources, and type checkers read py.typed.
    assert {f"dit8/csrc/{name}" for name in SOURCES} <= set(wheel)
    assert {"dit8/py.typed", "dit8/kernels/py.typed", "dit8/converters/py.typed"} <= set(wheel)
    import dit8
    assert f"dit8-{dit8.__version__}.dist-info/METADATA" in wheel  # the one version, read from the package
    extra = sorted(n for n in set(wheel) - expected if ".dist-info/" not in n)
    assert not extra, f"the wheel holds files that are not the packages': {extra}"


def test_the_sdist_holds_every_tracked_source_test_and_benchmark(tracked, built):
    _, sdist = built
    wanted = [name for name in tracked if name.partition("/")[0] in {*PACKAGES, "tests", "bench"}
              or name in ("pyproject.toml", "README.md", "MANIFEST.in")]
    missing = sorted(set(wanted) - set(sdist))
    assert not missing, f"tracked files missing from the sdist: {missing}"
    assert not [name for name in sdist if "__pycache__" in name or name.endswith(".pyc")]


def test_the_wheel_declares_the_command_and_the_extras_the_readme_names(dist):
    wheel = zipfile.ZipFile(dist[0])
    info = next(n.partition("/")[0] for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    assert "dit8 = dit8.cli:main" in wheel.read(f"{info}/entry_points.txt").decode().splitlines()
    metadata = wheel.read(f"{info}/METADATA").decode().splitlines()
    extras = {line.partition(": ")[2] for line in metadata if line.startswith("Provides-Extra: ")}
    assert extras == {"triton", "cuda", "bench", "test"}
    readme = (ROOT / "README.md").read_text()
    assert all(f"`[{extra}]`" in readme for extra in extras)


# Run from the unpacked wheel alone (not the checkout), with triton hidden as where dit8 is installed
# without its [triton] extra: the package imports, finds the CUDA sources it ships, and runs the torch backend.
_FROM_THE_WHEEL = r"""
import json, sys
sys.modules["triton"] = None  # import triton fails; importlib.util.find_spec("triton") is None
import torch, dit8
from dit8.config import tiny_config
from dit8.kernels import BackendError, cuda_ext
from dit8.random_dit import build_model, random_conditioning

model = build_model(tiny_config("i2v"), device="cpu")
cond = random_conditioning(model.config, 5, (64, 48), device="cpu")
with torch.no_grad():
    out = model(cond.x, cond.t, cond.context, cond.clip_fea, y=cond.y)
try:
    build_model(tiny_config("i2v"), device="cpu", backend="triton")
    refused = None
except BackendError as err:
    refused = str(err)
print(json.dumps({"package": dit8.__file__, "csrc": str(cuda_ext.source_dir()), "finite": bool(out.isfinite().all()),
                  "refused": refused, "triton": "triton" in sys.modules and sys.modules["triton"] is not None}))
"""


def test_the_installed_wheel_runs_without_the_checkout_and_without_triton(dist, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(dist[0]).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("DIT8_CSRC", None)
    version = subprocess.run([sys.executable, "-m", "dit8", "--version"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    import dit8
    assert version.returncode == 0 and version.stdout.strip() == f"dit8 {dit8.__version__}", version.stderr
    done = subprocess.run([sys.executable, "-c", _FROM_THE_WHEEL], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert Path(report["package"]).is_relative_to(site), report
    assert Path(report["csrc"]) == site / "dit8" / "csrc" and (site / "dit8" / "csrc" / "build.ninja").is_file()
    assert report["finite"] and not report["triton"]
    assert report["refused"] and "triton is not installed: pip install 'dit8[triton]'" in report["refused"], report
