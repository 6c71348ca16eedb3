"""The package's import graph: the names `dit8.choices` gathered keep the import paths they had."""

import importlib

import pytest

from dit8 import choices

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
