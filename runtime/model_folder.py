"""Finding the files of a Wan2.1 I2V model folder as published (spec/pipeline.md, "Files a user brings").

Official release (Wan-AI/Wan2.1-I2V-14B-480P), the undistilled base model:

    diffusion_pytorch_model-0000N-of-00007.safetensors + diffusion_pytorch_model.safetensors.index.json
    config.json, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer.json, ...),
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, Wan2.1_VAE.pth

LightX2V's step- and CFG-distilled release: config.json and google/umt5-xxl/ at the top, and the DiT in
one of (the encoders and VAE either beside it or at the top):

    distill_models/distill_model.safetensors     bf16 DiT, official key names
    distill_fp8/, distill_int8/                  the DiT quantized per block (block_N.safetensors +
    fp8/, int8/ (older names)                    non_block.safetensors, maybe with the index json LightX2V's
                                                 converter writes under OFFICIAL_INDEX's name), quantized
                                                 T5/CLIP .pth beside
    original/distill_model.safetensors           the older name of distill_models/
    wan2.1_i2v_480p_lightx2v_4step.safetensors   single files: bf16, scaled_fp8_e4m3, int8, and their
    (..._scaled_fp8_e4m3_..., ..._int8_..., ..._comfyui.safetensors variants)

`find_model_files(path, dit=..., scheme=...)` picks the DiT (see `DIT_CANDIDATES` for the order) and
the T5, CLIP, VAE and tokenizer files, and raises CheckpointError naming the file it expected for any
piece that is missing. dit8 runs the float T5 and CLIP (`models_t5_umt5-xxl-enc-bf16.pth`, the CLIP
.pth); the quantized encoder files of the fp8/int8 folders are not read.

Distilled or base (what the pipeline's defaults follow: 4 steps, no CFG, shift 5, or UniPC 40 steps,
CFG 5, shift 3): an explicit `distilled=` wins; else a DiT whose path below the model folder (or whose
file name) says "distill", "lightx2v" or "4step", or that sits in LightX2V's fp8/, int8/ or original/
folders, is distilled; else a folder of shards with the official index json (`OFFICIAL_INDEX`) is the
base model; else the model is distilled exactly when the model folder holds a LightX2V DiT (so another DiT
file given in an official folder means the base model, in a LightX2V folder the distilled one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, as_path, diffusers_pipeline_hint, optional_file,
                         why_missing)
from .errors import CheckpointError, InputError
from .packed_format import SCHEMES

__all__ = ["CLIP_FILE", "DIT_CANDIDATES", "ModelFiles", "SCHEMES", "T5_FILE", "TOKENIZER_FOLDER", "VAE_FILE",
           "find_model_files"]

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# The quantized encoders of LightX2V's releases (dit8 reads the bf16 ones), in QUANT_SCHEMES order.
T5_QUANTIZED = ("models_t5_umt5-xxl-enc-fp8.pth", "models_t5_umt5-xxl-enc-int8.pth")
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_QUANTIZED = ("clip-fp8.pth", "clip-int8.pth")
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_FOLDER = "google/umt5-xxl"
TOKENIZER_FILE = "tokenizer.json"
OFFICIAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"

# (kind, path below the model folder, scheme, distilled), in the order they are preferred. A folder
# kind counts when it holds .safetensors files; with `scheme=None` the first present one is taken:
# LightX2V's distilled DiTs, float before fp8 before int8, and then the official shards. A distilled
# single file dropped into the official folder, as LightX2V suggests, is meant to be used, whatever its
# scheme (the shards beside it are another model, the base one); `dit=` the folder itself, or
# `distilled=False` with dit=, picks the base model again.
DIT_CANDIDATES: tuple[tuple[str, str, str, bool], ...] = (
    ("distill_models", "distill_models/distill_model.safetensors", "bf16", True),
    ("original", "original/distill_model.safetensors", "bf16", True),
    ("single_file", "wan2.1_i2v_480p_lightx2v_4step.safetensors", "bf16", True),
    ("single_file", "wan2.1_i2v_480p_lightx2v_4step_comfyui.safetensors", "bf16", True),
    ("distill_fp8", "distill_fp8", "fp8", True),
    ("fp8", "fp8", "fp8", True),
    ("single_file", "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors", "fp8", True),
    ("single_file", "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step_comfyui.safetensors", "fp8", True),
    ("distill_int8", "distill_int8", "int8", True),
    ("int8", "int8", "int8", True),
    ("single_file", "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors", "int8", True),
    ("single_file", "wan2.1_i2v_480p_int8_lightx2v_4step_comfyui.safetensors", "int8", True),
    ("official", OFFICIAL_INDEX, "bf16", False),
)
# Folders that hold only a DiT variant (and maybe encoders): pointing at one means its parent is the model.
DIT_SUBFOLDERS = ("distill_models", "original", "distill_fp8", "distill_int8", "fp8", "int8")
DISTILLED_HINTS = ("distill", "lightx2v", "4step")


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model: `dit` is what `load_dit` reads (a file, or a folder of shards or
    per-block files); `tokenizer` is the folder holding tokenizer.json."""

    root: Path
    kind: str
    dit: Path
    scheme: str | None
    distilled: bool
    t5: Path
    clip: Path
    vae: Path
    tokenizer: Path

    @property
    def config_json(self) -> Path | None:
        """The model folder's config.json, which the DiT must agree with: the top folder's when `root` is
        one of its DiT subfolders (a DiT given by its subfolder or file still meets the folder's
        config), else root's; None when there is none."""
        candidates = [self.root.parent, self.root] if self.root.name in DIT_SUBFOLDERS else [self.root]
        return next((found for d in candidates if (found := optional_file(d / "config.json")) is not None), None)

    def describe(self) -> list[str]:
        """The folder, then one line per piece found with its path relative to it (`dit8 generate` prints
        them)."""
        def rel(p: Path) -> str:
            try:
                inside = p.relative_to(self.root)
            except ValueError:
                return str(p)
            return str(p) if inside == Path(".") else str(inside)

        if self.dit.is_dir() and any(self.dit.glob("*.index.json")):
            dit = f"{rel(min(self.dit.glob('*.index.json')))} (shards)"
        else:
            dit = rel(self.dit)
        return [f"model       {self.root} ({self.kind}, {'distilled' if self.distilled else 'base'})",
                f"dit         {dit}", f"t5          {rel(self.t5)}", f"clip        {rel(self.clip)}",
                f"vae         {rel(self.vae)}", f"tokenizer   {rel(self.tokenizer)}"]


def _present(root: Path, relative: str) -> bool:
    """Whether the candidate is there; CheckpointError where something broken is (a link to nothing: a
    Hugging Face cache's blob never fetched), rather than passing over it to another variant."""
    path = root / relative
    if relative.endswith(".safetensors") or relative.endswith(".json"):
        return optional_file(path) is not None
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: {why_missing(path, 'no such folder')}")
    return path.is_dir() and any(path.glob("*.safetensors"))


def _dit_path(root: Path, kind: str, relative: str) -> Path:
    return root if kind == "official" else root / relative


def _expected_list(scheme: str | None) -> str:
    names = [rel + ("/" if not rel.endswith((".json", ".safetensors")) else "")
             for _, rel, s, _ in DIT_CANDIDATES if scheme is None or s == scheme]
    return ", ".join(names)


def _has_hint(path: Path, root: Path) -> bool:
    """Whether the DiT's path below the model folder (or its own name, when outside) says distilled. The
    model folder is root's parent where root is one of DIT_SUBFOLDERS; paths compare as given (absolute),
    else with their folders' links resolved (not the file's own: a Hugging Face cache links it to a blob)."""
    model = root.parent if root.name in DIT_SUBFOLDERS else root
    parts = (path.name,)
    for inside, folder in ((path, model), (path.parent.resolve() / path.name, model.resolve())):
        try:
            parts = inside.relative_to(folder).parts
            break
        except ValueError:
            continue
    if any(h in part.lower() for part in parts for h in DISTILLED_HINTS):
        return True
    return bool(parts) and parts[0] in ("fp8", "int8", "original")


def _subfolder_scheme(name: str) -> str:
    """The scheme of the DiT in one of DIT_SUBFOLDERS, by its name."""
    return "int8" if "int8" in name else "fp8" if "fp8" in name else "bf16"


def _find_dit(root: Path, scheme: str | None) -> tuple[str, Path, str, bool]:
    # LightX2V's converter writes the official shards' index name (OFFICIAL_INDEX) beside the block files of
    # its quantized folders: pointed at, such a folder is that distilled 8-bit DiT, not an official base model.
    quantized_subfolder = root.name in DIT_SUBFOLDERS and _subfolder_scheme(root.name) != "bf16"
    for kind, relative, s, distilled in DIT_CANDIDATES:
        if kind == "official" and quantized_subfolder:
            continue
        if (scheme is None or s == scheme) and _present(root, relative):
            return kind, _dit_path(root, kind, relative), s, distilled
    if any(root.glob("*.index.json")) and scheme in (None, "bf16") and not quantized_subfolder:
        return "official", root, "bf16", False  # shards under another index name
    # A folder that is itself a DiT variant (the user pointed at distill_fp8/, say).
    if root.name in DIT_SUBFOLDERS:
        if (root / "distill_model.safetensors").is_file() and scheme in (None, "bf16"):
            return root.name, root / "distill_model.safetensors", "bf16", True
        if any(root.glob("*.safetensors")):
            s = _subfolder_scheme(root.name)
            if scheme is None or s == scheme:
                return root.name, root, s, True
    what = f"no {scheme} DiT" if scheme else "no DiT"
    hint = diffusers_pipeline_hint(root)
    if hint:
        # Its DiT loads (load_dit, dit=/--dit); its encoders and VAE are in diffusers' layout, which the
        # pipeline does not read.
        raise CheckpointError(f"{root}: {what} found{hint}: give it with dit=/--dit, "
                              f"with the official release's {T5_FILE}, {CLIP_FILE} and {VAE_FILE} in {root} (the "
                              f"pipeline does not read diffusers' text_encoder/, image_encoder/ or vae/)")
    raise CheckpointError(f"{root}: {what} found; expected one of: {_expected_list(scheme)} "
                          f"(or give the DiT file or folder with dit=/--dit)")


def _search_dirs(root: Path, dit: Path) -> list[Path]:
    dirs = [dit if dit.is_dir() else dit.parent, root]
    if root.name in DIT_SUBFOLDERS:
        dirs.append(root.parent)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _find_file(dirs: list[Path], name: str, what: str, quantized: tuple[str, ...] = ()) -> Path:
    for d in dirs:
        if optional_file(d / name) is not None:
            return d / name
    found = [d / q for d in dirs for q in quantized if (d / q).is_file()]
    looked = ", ".join(str(d) for d in dirs)
    if found:
        raise CheckpointError(f"{dirs[-1] / name}: {what} not found (looked in {looked}); only the quantized "
                              f"{found[0].name} is there, which dit8 does not read: put the float {name} "
                              f"of the release beside it")
    raise CheckpointError(f"{dirs[-1] / name}: {what} not found (looked in {looked})")


def _find_tokenizer(dirs: list[Path]) -> Path:
    for d in dirs:
        if optional_file(d / TOKENIZER_FOLDER / TOKENIZER_FILE) is not None:
            return d / TOKENIZER_FOLDER
    looked = ", ".join(str(d) for d in dirs)
    raise CheckpointError(f"{dirs[-1] / TOKENIZER_FOLDER / TOKENIZER_FILE}: umT5 tokenizer not found "
                          f"(looked in {looked})")


def find_model_files(path: str | Path, *, dit: str | Path | None = None, scheme: str | None = None,
                     distilled: bool | None = None) -> ModelFiles:
    """Locate the DiT, T5, CLIP, VAE and tokenizer of a model folder.

    path: the model folder (official or LightX2V layout), one of its DiT subfolders, or a DiT file
        (then the folder around it is the model folder).
    dit: a DiT file or folder to use instead of the folder's own (relative paths are tried against the
        current directory, then the model folder).
    scheme: "bf16", "fp8" or "int8": which of the folder's DiT variants to take (default: the first
        present in DIT_CANDIDATES order, float before fp8 before int8). With `dit`, or a DiT file as
        `path`, there is no choice to make: InputError (the DiT's own weights decide its format).
    distilled: override the distilled/base rule of the module docstring.
    """
    if scheme is not None and scheme not in SCHEMES:
        raise InputError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if distilled is not None and not isinstance(distilled, bool):  # bool("no") would be True
        raise InputError(f"distilled must be True, False or None, got {distilled!r}")
    # Absolute (links kept): "." or a relative DiT file must name their folders as the absolute path does.
    root = Path(os.path.abspath(as_path(path, "path")))
    if not root.exists():
        raise CheckpointError(f"{root}: {why_missing(root, 'no such model folder')}")
    given = f"dit={str(dit)!r}" if dit is not None else None
    if root.is_file():
        if root.suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
            raise CheckpointError(f"{root}: neither a model folder nor a DiT checkpoint "
                                  f"({', '.join((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))})")
        if dit is not None:
            raise InputError(f"two DiTs given: the DiT file {str(root)!r} as the model and {given}; give the model "
                             f"folder with dit=, or the DiT file alone")
        dit, given = root, f"the DiT file {str(root)!r}"
        root = root.parent
    if given is not None and scheme is not None:
        # (It was ignored: a user asking for int8 got whatever the file held.)
        raise InputError(f"scheme {scheme!r} chooses among a model folder's DiTs; with {given} there is none to "
                         f"choose (its weights decide its format): leave the scheme out")
    if dit is not None:
        dit_path = as_path(dit, "dit")
        if not dit_path.exists() and not dit_path.is_absolute() and (root / dit_path).exists():
            dit_path = root / dit_path
        if not dit_path.exists():
            raise CheckpointError(f"{dit_path}: {why_missing(dit_path, 'DiT file or folder not found')}")
        dit_path = Path(os.path.abspath(dit_path))
        kind, dit_scheme = "override", None
        if _has_hint(dit_path, root):
            is_distilled = True
        elif dit_path.is_dir() and (dit_path / OFFICIAL_INDEX).is_file():
            is_distilled = False
        else:
            is_distilled = any(lightx2v for _, rel, _, lightx2v in DIT_CANDIDATES if _present(root, rel))
    else:
        kind, dit_path, dit_scheme, is_distilled = _find_dit(root, scheme)
    if distilled is not None:
        is_distilled = bool(distilled)
    dirs = _search_dirs(root, dit_path)
    return ModelFiles(
        root=root, kind=kind, dit=dit_path, scheme=dit_scheme, distilled=is_distilled,
        t5=_find_file(dirs, T5_FILE, "T5 text encoder", T5_QUANTIZED),
        clip=_find_file(dirs, CLIP_FILE, "CLIP image encoder", CLIP_QUANTIZED),
        vae=_find_file(dirs, VAE_FILE, "VAE"),
        tokenizer=_find_tokenizer(dirs),
    )
