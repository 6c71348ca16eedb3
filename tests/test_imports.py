"""The package's import graph: each module imports on its own, whatever was imported before; `dit8`'s
public names load on first use (PEP 562) and behave as eagerly imported ones did; objects and errors
pickled here load in a fresh process; the names `dit8.choices` gathered keep their import paths."""

import ast
import importlib
import json
import pickle
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit8
from dit8 import choices
from dit8.config import tiny_config
from dit8.converters import ConvertError
from dit8.kernels import BackendError, OpArgumentError

ROOT = Path(__file__).resolve().parents[1]

# The modules that defined each choice before dit8.choices held them: code importing them from there
# keeps working.
_CHOICES_BEFORE = {
    "dit8.sampler": ("DETERMINISTIC", "RENOISE", "UPDATE_RULES"),
    "dit8.pipeline": ("DISTILLED", "UNIPC", "SAMPLERS"),
    "dit8.packed_format": ("QUANT_SCHEMES", "SCHEMES"),
    "dit8.kernels.registry": ("BACKENDS",),
    "dit8.kernels.attention": ("PRECISIONS",),
}


@pytest.mark.parametrize("module, names", _CHOICES_BEFORE.items(), ids=list(_CHOICES_BEFORE))
def test_choices_keep_their_old_import_paths(module, names):
    found = importlib.import_module(module)
    for name in names:
        assert getattr(found, name, None) is getattr(choices, name), f"{module}.{name}"


def _run(script: str, *args: str, stdin: bytes | None = None) -> dict:
    """Run `script` in a fresh interpreter; what it printed last, as JSON."""
    done = subprocess.run([sys.executable, "-c", script, *args], input=stdin, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json.loads(done.stdout.decode().splitlines()[-1])


# Every module of dit8, dit8.kernels and dit8.converters, each imported with none of dit8 loaded: dit8's
# modules leave sys.modules between imports, so each import runs its own imports from scratch, in its own
# order (torch and the other dependencies stay loaded: importing them is what takes seconds). A missing
# optional dependency (triton) is not a failure.
_EACH_MODULE = r"""
import importlib, importlib.util, json, pkgutil, sys
import dit8, dit8.converters, dit8.kernels

packages = (dit8, dit8.kernels, dit8.converters)
names = [p.__name__ for p in packages] + sorted(f"{p.__name__}.{m.name}" for p in packages
                                                for m in pkgutil.iter_modules(p.__path__) if m.name != "__main__")
# Defined once: these define torch.library ops, which a second import would define again.
keep = {"dit8.kernels.fused_triton", "dit8.kernels.cuda_ext"}
failed, lazy = {}, {}
for name in names:
    for loaded in [m for m in sys.modules if m.partition(".")[0] == "dit8" and m not in keep]:
        del sys.modules[loaded]
    # Whatever reaches dit8's lazy names while this module imports (dit8.__getattr__, under its lock).
    package = importlib.import_module("dit8")
    lazy_getattr = package.__getattr__
    package.__getattr__ = lambda attr, name=name, lazy_getattr=lazy_getattr: (
        lazy.setdefault(name, []).append(attr), lazy_getattr(attr))[1]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        top = (err.name or "dit8").partition(".")[0]
        if top == "dit8" or importlib.util.find_spec(top) is not None:
            failed[name] = repr(err)
    except Exception as err:
        failed[name] = repr(err)
print(json.dumps({"names": names, "failed": failed, "lazy": lazy}))
"""


def test_every_module_imports_on_its_own():
    report = _run(_EACH_MODULE)
    assert {"dit8.cli", "dit8.kernels.attention", "dit8.converters.convert", "dit8.kernels.fused_triton"} <= set(
        report["names"])
    assert report["failed"] == {}
    # No module's import goes through dit8's lazy names: one that did, importing in one thread while
    # another held their lock, could wait for it while that thread waited for this module (a deadlock).
    assert report["lazy"] == {}


# Several threads' first uses of dit8 at once: each import waits for the one before, where a package
# read half-imported by another thread raised "cannot import name ... from partially initialized module".
_THREADS = r"""
import json, threading
import dit8

names = ["WanDiT", "random_dit", "converters", "I2VPipeline"]
start, errors = threading.Barrier(len(names)), []

def use(name):
    start.wait()
    try:
        getattr(dit8, name)
    except Exception as err:
        errors.append(f"{name}: {err!r}")

threads = [threading.Thread(target=use, args=(name,)) for name in names]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"errors": errors}))
"""


def test_first_uses_from_several_threads_at_once():
    assert _run(_THREADS)["errors"] == []


# `import dit8`, then its names: found on first use, complete, and their errors the real ones.
_NAMESPACE = r"""
import json, sys

sys.modules["av"] = None  # PyAV "missing": the modules that need it must say so
import dit8

report = {"torch_loaded": "torch" in sys.modules, "missing": {}}
for name in ["video", "Video", "I2VPipeline"]:
    try:
        getattr(dit8, name)
    except Exception as err:
        report["missing"][name] = [type(err).__name__, getattr(err, "name", None)]
del sys.modules["av"]  # it is installed after all
report["hasattr"] = {name: hasattr(dit8, name) for name in ["nope", "tt5", "Kernels", "t5", "kernels", "converters"]}
namespace = {}
exec("from dit8 import *", namespace)
report["star"] = sorted(set(namespace) - {"__builtins__"})
report["all"] = sorted(dit8.__all__)
report["unresolved"] = [name for name in dit8.__all__ if getattr(dit8, name, None) is None]
report["not_in_dir"] = sorted(set(dit8.__all__) - set(dir(dit8)))
import pydoc
text = pydoc.render_doc(dit8, renderer=pydoc.plaintext)
report["not_in_help"] = [name for name in dit8.__all__ if name != "__version__" and name not in text]
print(json.dumps(report))
"""


def test_the_package_loads_its_names_on_first_use():
    report = _run(_NAMESPACE)
    assert report["torch_loaded"] is False
    # a missing dependency surfaces as itself, from the submodule and from the names that need it
    assert report["missing"] == {name: ["ModuleNotFoundError", "av"] for name in ["video", "Video", "I2VPipeline"]}
    # unknown names and misspelt submodules are AttributeErrors (hasattr False); submodules are attributes
    assert report["hasattr"] == {"nope": False, "tt5": False, "Kernels": False, "t5": True, "kernels": True,
                                 "converters": True}
    assert report["star"] == report["all"]
    assert report["unresolved"] == [] and report["not_in_dir"] == [] and report["not_in_help"] == []


def test_type_checkers_see_every_name_the_package_gives_at_run_time():
    # Checkers read the `if TYPE_CHECKING:` imports of dit8/__init__.py, not __getattr__ (which they do not
    # see: its Any would let any misspelt name pass): a public name or submodule missing there is an error
    # to them, where the code runs.
    tree = ast.parse(Path(dit8.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    names, submodules = {}, set()
    for node in block.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                if node.module is None:
                    submodules.add(alias.name)
                else:
                    names[alias.name] = node.module
    assert names == dit8._EXPORTS
    # The modules in dit8's folder, and the Python packages pyproject.toml maps from their own folders
    # (an installed dit8 has them in its folder; an editable one does not).
    mapped = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    packages = {name.strip(' "').removeprefix("dit8.") for name in mapped.split(",")} - {"dit8", "csrc"}
    assert submodules == {m.name for m in pkgutil.iter_modules(dit8.__path__) if m.name != "__main__"} | packages


# A dependency whose import fails inside with an AttributeError (another version of it, say: PyAV here).
_BROKEN_DEPENDENCY = r"""
import importlib.abc, importlib.util, json, sys


class BrokenAv(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "av" else None

    def exec_module(self, module):
        raise AttributeError("module 'numpy' has no attribute 'bool8'")


sys.meta_path.insert(0, BrokenAv())
import dit8

report = {}
for name in ["video", "Video", "I2VPipeline"]:
    try:
        getattr(dit8, name)
    except Exception as err:
        report[name] = [type(err).__name__, str(err), repr(err.__cause__)]
try:
    exec("from dit8 import Video")
except Exception as err:
    report["from dit8 import Video"] = [type(err).__name__, str(err), repr(err.__cause__)]
print(json.dumps(report))
"""


def test_an_attribute_error_while_importing_a_name_is_not_taken_for_its_absence():
    # Python takes an AttributeError out of the module's __getattr__ for "no such name": `from dit8
    # import Video` would say only "cannot import name 'Video'", and hasattr(dit8, "Video") be False.
    report = _run(_BROKEN_DEPENDENCY)
    error = AttributeError("module 'numpy' has no attribute 'bool8'")
    assert report == {name: ["ImportError", f"importing dit8.{module} failed: {error}", repr(error)] for name, module in
                      [("video", "video"), ("Video", "pipeline"), ("I2VPipeline", "pipeline"),
                       ("from dit8 import Video", "pipeline")]}


_UNPICKLE = r"""
import json, pickle, sys

objects = pickle.loads(sys.stdin.buffer.read())
print(json.dumps([repr(o) for o in objects]))
"""


def test_objects_pickled_here_load_in_a_fresh_process():
    # Errors cross processes pickled (multiprocessing, concurrent.futures), and so may settings and events;
    # the fresh process has imported nothing of dit8: unpickling imports what each needs.
    from dit8.pipeline import ProgressEvent, Video

    objects = [dit8.InputError("x has shape (1,)"), dit8.CheckpointError("a.safetensors: missing key"),
               dit8.Cancelled("stopped"), dit8.NumericalError("step 2 of 4: NaN"), ConvertError("bad scheme"),
               BackendError("no triton"), OpArgumentError("linear: x has dtype torch.int8"), tiny_config(),
               dit8.DistilledSampler(),
               dit8.UniPCSampler(), ProgressEvent("denoise", 1, 4, 0.5, timestep=750.0, x0=torch.zeros(2)),
               Video(frames=torch.zeros(5, 16, 16, 3, dtype=torch.uint8), timings={"total": 1.0})]
    assert _run(_UNPICKLE, stdin=pickle.dumps(objects)) == [repr(o) for o in objects]
