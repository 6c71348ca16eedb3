"""What the wheel and the source distribution hold, built from this checkout's tracked files with the
installed setuptools (no build isolation: offline, a few seconds)."""

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
def built(tmp_path_factory, tracked) -> tuple[list[str], list[str]]:
    """(the wheel's file names, the sdist's file names below its top folder), built from a copy of the
    tracked files, so that neither build outputs nor untracked files of the checkout take part."""
    tree, dist = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("dist")
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        out = subprocess.run([sys.executable, "-c", f"import sys, setuptools.build_meta as b; b.{hook}(sys.argv[1])",
                              str(dist)], cwd=tree, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    (wheel_path,), (sdist_path,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
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
