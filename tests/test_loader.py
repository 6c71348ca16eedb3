"""Checkpoint reading: every kind of bad input raises CheckpointError naming the file and the key."""

import gc
import json
import math
import os
import re
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dit8
from dit8 import CheckpointError, InputError
from dit8.checkpoint import Checkpoint
from dit8.config import I2V_14B, WanConfig
from dit8.converters import convert
from dit8.layouts import OFFICIAL, expected_shapes
from dit8 import loader
from dit8.loader import _infer_config
from dit8.testing import random_weights, tiny_config, write_checkpoint

CONFIG = tiny_config("i2v", num_layers=2)


@pytest.fixture
def weights():
    return random_weights(CONFIG, seed=2)


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        dit8.load_dit(path)
    return str(info.value)


# spec/wan21-dit.md's configurations: (dim, ffn_dim, heads, layers, in_dim, clip_dim) of each.
SPEC_CONFIGS = {"i2v-14b": (5120, 13824, 40, 40, 36, 1280), "t2v-14b": (5120, 13824, 40, 40, 16, None),
                "t2v-1.3b": (1536, 8960, 12, 30, 16, None)}


@pytest.mark.parametrize("name", SPEC_CONFIGS)
def test_the_released_configurations_from_shapes_alone(name):
    # No shape shows the head count: without a config.json it comes from Wan's 128-wide heads. The rest
    # (patch, freq_dim, text_dim, text_len, eps) is the same in every release.
    dim, ffn_dim, heads, layers, in_dim, clip_dim = SPEC_CONFIGS[name]
    config = WanConfig(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers, in_dim=in_dim, out_dim=16,
                       clip_dim=clip_dim)
    assert (config.patch_size, config.freq_dim, config.text_dim, config.text_len, config.eps, config.head_dim) == (
        (1, 2, 2), 256, 4096, 512, 1e-6, 128)
    shapes = expected_shapes(config)
    assert _infer_config(shapes, Path("m.safetensors"), OFFICIAL, None) == config
    if name == "i2v-14b":
        assert config == I2V_14B
        assert len(shapes) == 1303 and sum(math.prod(s) for s in shapes.values()) == 16_394_878_784


def test_absent_path(tmp_path):
    assert str(tmp_path / "nope.safetensors") in load_error(tmp_path / "nope.safetensors")


def test_a_path_too_long_for_the_file_system(tmp_path):
    path = tmp_path / ("a" * 5000 + ".safetensors")
    assert load_error(path) == f"{path}: cannot read: File name too long"


def test_a_symlink_loop_or_dangling_link_is_not_called_absent(tmp_path):
    loop, dangling = tmp_path / "loop.safetensors", tmp_path / "dangling.safetensors"
    loop.symlink_to(loop)
    dangling.symlink_to(tmp_path / "gone.safetensors")
    assert load_error(loop) == f"{loop}: a loop of symbolic links"
    gone = tmp_path / "gone.safetensors"
    assert load_error(dangling) == f"{dangling}: a symbolic link to {gone}, which does not exist"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(loop))}: a loop of symbolic links$"):
        dit8.find_model_files(loop)


def test_missing_tensor_named_in_the_files_layout(tmp_path, weights):
    del weights["blocks.1.cross_attn.k_img.weight"]
    path = write_checkpoint(weights, tmp_path / "d", layout="diffusers", fmt="sharded")
    msg = load_error(path)
    assert "blocks.1.attn2.add_k_proj.weight" in msg and str(path) in msg


def test_missing_block_tensor_in_a_per_block_folder(tmp_path, weights):
    del weights["blocks.0.ffn.2.bias"]
    path = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    assert "blocks.0.ffn.2.bias" in load_error(path)


def test_the_published_depths_are_the_spec_configurations():
    assert loader.PUBLISHED_DEPTHS == {(dim, ffn): layers for dim, ffn, _, layers, *_ in SPEC_CONFIGS.values()}


def test_a_per_block_folder_that_lost_its_last_file(tmp_path, monkeypatch):
    # Its block numbers have no gap: the published models' depth for their width shows the loss. (The tiny
    # configuration stands in for a published one.)
    config = tiny_config("i2v", num_layers=3)
    monkeypatch.setitem(loader.PUBLISHED_DEPTHS, (config.dim, config.ffn_dim), 3)
    weights = random_weights(config, seed=3)
    path = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    (path / "block_2.safetensors").unlink()
    assert load_error(path) == (f"{path}: blocks 0-1 only, where the Wan2.1 DiTs of dim 256 have 3: the tensors of "
                                f"the last blocks are missing (a lost file?); a model of another depth needs a "
                                f"config.json with num_layers beside the weights")
    # A config stating the depth: the shallower model, or the loss named against the config.
    shallow = write_checkpoint({k: v for k, v in weights.items() if not k.startswith("blocks.2.")}, tmp_path / "two",
                               fmt="per_block", config=tiny_config("i2v", num_layers=2))
    assert dit8.load_dit(shallow).config.num_layers == 2
    write_checkpoint(weights, tmp_path / "three", fmt="per_block", config=config)
    (tmp_path / "three" / "block_2.safetensors").unlink()
    assert load_error(tmp_path / "three") == f"{tmp_path / 'three' / 'config.json'}: num_layers = 3 disagrees with " \
                                             f"the weights (2)"


def test_the_exception_of_a_load_that_failed_part_way_holds_no_model(tmp_path, weights, monkeypatch):
    # A service that keeps it (or loads another checkpoint inside its except block) keeps no second model.
    weights["head.head.bias"] = torch.full_like(weights["head.head.bias"], float("nan"))  # read late
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    built, make = [], loader.WanDiT

    def recorded(*args, **kwargs):
        model = make(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loader, "WanDiT", recorded)
    with pytest.raises(CheckpointError, match="head.head.bias") as info:
        dit8.load_dit(path)
    gc.collect()
    assert len(built) == 1 and built[0]() is None
    assert "in load_dit" in "".join(traceback.format_exception(info.value))


def test_hidden_files_in_a_folder_are_not_read(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    (path / "._block_0.safetensors").write_bytes(b"\x00\x05\x16\x07" * 1024)  # a macOS resource fork
    (path / ".model.safetensors.index.json").write_text("{}")
    assert dit8.load_dit(path).config.num_layers == CONFIG.num_layers


def test_unexpected_tensor(tmp_path, weights):
    weights["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    msg = load_error(path)
    assert "blocks.0.self_attn.extra.weight" in msg and "m.safetensors" in msg


def test_a_tensor_of_a_far_block_is_named_before_that_many_blocks_are_expected(tmp_path, weights):
    # (Before, the expected tensor set was built for all 100001 blocks, and reported them missing.)
    weights["blocks.100000.norm3.bias"] = weights.pop("blocks.1.norm3.bias")
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    assert load_error(path) == (f"{path}: block 2 has no tensors, but 'blocks.100000.norm3.bias' (in m.safetensors) "
                                f"is of block 100000: blocks are numbered from 0 without gaps")


@pytest.mark.parametrize("number", ["\u00b2", "9" * 5000, "01"])  # a digit int() refuses; past int()'s limit
def test_a_block_number_that_is_no_plain_decimal_is_an_unexpected_tensor(tmp_path, weights, number):
    key = f"blocks.{number}.norm3.bias"
    weights[key] = weights.pop("blocks.1.norm3.bias")
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    msg = load_error(path)
    assert msg.startswith(f"{path}: unexpected tensor {key!r}"), msg


def test_tensor_of_an_unknown_module_in_comfyui_file(tmp_path, weights):
    weights["vae.decoder.weight"] = torch.zeros(3)
    path = write_checkpoint(weights, tmp_path / "m.safetensors", layout="comfyui")
    assert "model.diffusion_model.vae.decoder.weight" in load_error(path)


@pytest.mark.parametrize("odd_layout", ["comfyui", "diffusers"])
def test_a_block_file_of_another_layout_in_a_per_block_folder(tmp_path, weights, odd_layout):
    """One file of ComfyUI (or diffusers) names among official ones: the refusal also names the file whose
    names set the layout, which is the odd one out when it is the only such file."""
    path = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    write_checkpoint({k: v for k, v in weights.items() if k.startswith("blocks.1.")}, tmp_path / "b1.safetensors",
                     layout=odd_layout)
    (tmp_path / "b1.safetensors").replace(path / "block_1.safetensors")
    msg = load_error(path)
    assert f"in a {odd_layout}-layout checkpoint (as " in msg and "in block_1.safetensors shows)" in msg, msg


def test_one_tensor_under_both_comfyui_prefixes(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors", layout="comfyui")
    tensors = {k: weights[k.removeprefix("model.diffusion_model.")] for k in
               dit8.open_dit(path).checkpoint.keys()}
    tensors["diffusion_model.blocks.0.ffn.0.weight"] = weights["blocks.0.ffn.0.weight"] * 2
    save_file(tensors, str(path))
    assert load_error(path) == (f"{path}: tensors 'diffusion_model.blocks.0.ffn.0.weight' (in m.safetensors) and "
                                f"'model.diffusion_model.blocks.0.ffn.0.weight' are both 'blocks.0.ffn.0.weight'")
    with pytest.raises(CheckpointError, match="are both 'blocks.0.ffn.0.weight'"):
        convert(path, tmp_path / "o.safetensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_misshaped_tensor(tmp_path, weights):
    weights["blocks.1.self_attn.q.weight"] = torch.zeros(CONFIG.dim, CONFIG.dim + 1)
    msg = load_error(write_checkpoint(weights, tmp_path / "m.safetensors"))
    assert "blocks.1.self_attn.q.weight" in msg and str((CONFIG.dim, CONFIG.dim + 1)) in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, weights, bad):
    weights["blocks.0.ffn.0.weight"][3, 4] = bad
    path = write_checkpoint(weights, tmp_path / "m.pth", fmt="pth")
    msg = load_error(path)
    assert "blocks.0.ffn.0.weight" in msg and "m.pth" in msg and ("NaN" if bad != bad else "Inf") in msg


def test_finite_values_that_overflow_the_models_dtype(tmp_path, weights):
    """The check for NaN/Inf holds for what the model stores, not only for what the file holds: a finite
    fp32 weight beyond fp16's range, or a float64 one beyond fp32's, would become Inf when narrowed."""
    weights["blocks.0.ffn.0.weight"][0, 0] = 1e5  # > 65504
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as info:
        dit8.load_dit(path, dtype=torch.float16)
    assert str(info.value) == (f"{path}: tensor 'blocks.0.ffn.0.weight' overflows float16 (magnitudes above "
                               f"6.55e+04); load it with dtype torch.bfloat16 or torch.float32")
    assert dit8.load_dit(path).get_buffer("blocks.0.ffn.0.weight")[0, 0] == 1e5  # fp32 holds it
    weights = {key: value.double() for key, value in weights.items()}
    weights["text_embedding.0.weight"][0, 0] = 1e300
    assert load_error(write_checkpoint(weights, tmp_path / "m64.safetensors")) == (
        f"{tmp_path / 'm64.safetensors'}: tensor 'text_embedding.0.weight' overflows float32 (magnitudes above "
        f"3.403e+38)")


def test_a_dimension_of_size_zero(tmp_path, weights):
    weights["patch_embedding.weight"] = weights["patch_embedding.weight"][:, :, :0]
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    shape = (CONFIG.dim, CONFIG.in_dim, 0, 2, 2)
    assert load_error(path) == f"{path}: tensor 'patch_embedding.weight' has shape {shape}, with a dimension of size 0"


@pytest.mark.parametrize("kind", ["dangling link", "folder"])
def test_a_broken_config_json_is_not_skipped(tmp_path, weights, kind):
    """A config.json beside the weights that cannot be read (a Hugging Face cache's link to a blob never
    fetched) must not read as no config.json: the head count it states would go unchecked."""
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    config = tmp_path / "config.json"
    if kind == "folder":
        config.mkdir()
        expected = "a folder, where a file is expected"
    else:
        config.symlink_to(tmp_path / "blobs" / "missing")
        expected = f"a symbolic link to {tmp_path / 'blobs' / 'missing'}, which does not exist"
    assert load_error(path) == f"{config}: {expected}"


def test_truncated_safetensors(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = load_error(path)
    assert "m.safetensors" in msg and "truncated" in msg


def test_bytes_past_the_tensor_data(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    with open(path, "ab") as f:
        f.write(b"\0" * 3)
    assert load_error(path) == f"{path}: corrupt: 3 bytes past the end of the tensor data the header describes"


def test_truncated_header(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x10\x00")
    assert "truncated" in load_error(path)


def test_corrupt_safetensors_header(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[8:20] = b"garbage!!!!!"
    path.write_bytes(bytes(data))
    msg = load_error(path)
    assert "m.safetensors" in msg and "corrupt" in msg


def _with_raw_header(path, make) -> None:
    """Replace a safetensors file's header with the bytes (or text) `make(header)` gives for its parsed
    JSON header, the data left as it is (`_with_header` below writes back a valid JSON object)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = make(json.loads(data[8:8 + n]))
    raw = raw if isinstance(raw, bytes) else raw.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("case", ["nested", "inf_shape", "float_offset", "string_shape", "bom", "utf16",
                                  "metadata_false", "bool_shape"])
def test_malformed_safetensors_headers_are_named(tmp_path, weights, case):
    """Headers safetensors refuses, refused here too with the file named (the converter reads headers itself):
    no RecursionError, OverflowError or silent truncation of a float to an int."""
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    key = "blocks.0.ffn.0.bias"

    def make(header: dict):
        entry = header[key]
        if case == "nested":
            return json.dumps(header)[:-1] + ', "z": ' + "[" * 5000 + "]" * 5000 + "}"
        if case == "inf_shape":
            entry["shape"] = ["INF"]
            return json.dumps(header).replace('["INF"]', "[1e999]")
        if case == "float_offset":
            entry["data_offsets"] = [float(o) for o in entry["data_offsets"]]
        elif case == "string_shape":
            entry["shape"] = [str(d) for d in entry["shape"]]
        elif case == "metadata_false":
            header["__metadata__"] = False
        elif case == "bool_shape":  # [true, 6, dim]: the bytes add up if true were counted as 1
            assert header["blocks.0.modulation"]["shape"][0] == 1
            header["blocks.0.modulation"]["shape"][0] = True
        elif case == "bom":
            return b"\xef\xbb\xbf" + json.dumps(header).encode()
        elif case == "utf16":
            return json.dumps(header).encode("utf-16")
        return json.dumps(header)

    _with_raw_header(path, make)
    msg = load_error(path)
    assert str(path) in msg and "corrupt" in msg, msg
    with pytest.raises(CheckpointError, match="corrupt"):
        dit8.checkpoint.open_checkpoint(path)


def test_null_metadata_is_no_metadata(tmp_path, weights):
    """`"__metadata__": null` is read as safetensors reads it: as none."""
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    _with_raw_header(path, lambda header: json.dumps({**header, "__metadata__": None}))
    assert dit8.checkpoint.open_checkpoint(path).metadata == {}


@pytest.mark.parametrize("case", ["int_key", "sparse", "meta"])
def test_pth_entries_that_are_not_named_dense_tensors(tmp_path, weights, case):
    if case == "int_key":
        weights[7] = torch.zeros(2)
        match = "entry 7 is named by a int"
    elif case == "sparse":
        weights["blocks.0.ffn.0.bias"] = weights["blocks.0.ffn.0.bias"].to_sparse()
        match = "'blocks.0.ffn.0.bias' is not a dense tensor"
    else:
        weights["blocks.0.ffn.0.bias"] = weights["blocks.0.ffn.0.bias"].to("meta")
        match = "'blocks.0.ffn.0.bias' is not a dense tensor"
    path = tmp_path / "m.pth"
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match=match) as err:
        dit8.checkpoint.open_checkpoint(path)
    assert "m.pth" in str(err.value)


def test_corrupt_pth(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.pth", fmt="pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "m.pth" in load_error(path)


@pytest.mark.parametrize("damage", ["short_record", "relabelled_storage", "missing_record"])
def test_a_pth_whose_storage_records_disagree_with_its_pickle(tmp_path, weights, damage):
    # Memory-mapped, torch.load does not compare a storage's record with what the pickle declares: a short
    # record was read on into the next one, and a FloatStorage relabelled HalfStorage loaded as fp16.
    import zipfile

    path = write_checkpoint(weights, tmp_path / "ok.pth", fmt="pth")
    damaged = tmp_path / "m.pth"

    def edit(name: str, data: bytes) -> bytes:
        if damage == "short_record" and name.endswith("/data/0"):
            return data[:-4]
        if damage == "relabelled_storage" and name.endswith("/data.pkl"):
            return data.replace(b"FloatStorage", b"HalfStorage")
        return data

    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for name in zin.namelist():
            if not (damage == "missing_record" and name.endswith("/data/0")):
                zout.writestr(name, edit(name, zin.read(name)))
    msg = load_error(damaged)
    assert msg.startswith(f"{damaged}: "), msg
    if damage == "missing_record":
        assert "data/0" in msg or "'0'" in msg, msg
    else:
        assert re.search(r"corrupt: the storage record \w+/data/0 holds \d+ bytes, where its pickle declares \d+",
                         msg), msg
    assert dit8.checkpoint.open_checkpoint(path).keys() == list(weights)  # rewritten unchanged, it loads


@pytest.mark.parametrize("record", ["data/0", "data.pkl"])
def test_a_pth_with_a_compressed_record_is_refused(tmp_path, weights, record):
    # torch.save stores its records; a repacked zip may deflate them. Memory-mapped, a deflated storage was
    # read as its compressed bytes (wrong values, no error); a deflated data.pkl is inflated whole however
    # large (padded with zeros past its STOP, a few MB of file took gigabytes).
    import zipfile

    path = write_checkpoint({"w": torch.arange(64.0)}, tmp_path / "ok.pth", fmt="pth")
    damaged = tmp_path / "m.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            deflate = name.endswith("/" + record)
            if deflate and record == "data.pkl":
                data += bytes(1 << 20)
            zout.writestr(name, data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(damaged))}: the record \w+/{re.escape(record)} is "
                                              rf"compressed \(\d+ bytes in \d+\), where torch.save stores"):
        dit8.checkpoint.open_checkpoint(damaged).read("w")
    assert torch.equal(dit8.checkpoint.open_checkpoint(path).read("w"), torch.arange(64.0))


def test_a_pth_that_is_no_torch_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"definitely not a pickle" * 10)
    assert "junk.pth: not a torch checkpoint" in load_error(path)


@pytest.mark.parametrize("case, suffix, says", [
    ("lfs", ".safetensors", "not a safetensors file: a Git LFS pointer"),
    ("lfs", ".pth", "not a torch checkpoint: a Git LFS pointer"),
    ("html", ".safetensors", "not a safetensors file: an HTML or XML page"),
    ("html", ".pth", "not a torch checkpoint: an HTML or XML page"),
    ("json_error", ".safetensors", "not a safetensors file: a text file, not tensors (it begins '{\"error\""),
    ("gguf", ".safetensors", "not a safetensors file: a GGUF file"),
    ("torch_zip", ".safetensors", "not a safetensors file: a zip archive, as torch.save writes: name it .pth"),
    ("legacy_pickle", ".safetensors", "not a safetensors file: a pickle, as older torch.save writes: name it .pth"),
    ("safetensors", ".pth", "not a torch checkpoint: a safetensors file: name it .safetensors"),
])
def test_a_file_that_is_something_else_is_named_as_such(tmp_path, weights, case, suffix, says):
    """What a failed download or a mix-up leaves under a checkpoint's name is told from its first bytes."""
    path = tmp_path / f"dit{suffix}"
    if case == "lfs":
        path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'ab' * 32}\nsize 32789452800\n")
    elif case == "html":
        path.write_text("<!DOCTYPE html>\n<html lang=\"en\"><head><title>Ünïcode · 404</title></head></html>\n")
    elif case == "json_error":
        path.write_text('{"error":"Access to model Wan-AI/x is restricted. You must be authenticated."}')
    elif case == "gguf":
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(120))
    elif case == "torch_zip":
        torch.save({"w": torch.zeros(2)}, path)
    elif case == "legacy_pickle":
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    assert load_error(path).startswith(f"{path}: {says}")


@pytest.mark.parametrize("key", ["diffusion_model.blocks.0.self_attn.q.lora_down.weight",
                                 "transformer.blocks.0.attn1.to_q.lora_A.default.weight",
                                 "lora_unet_blocks_0_self_attn_q.lora_down.weight"])
def test_a_lora_is_not_read_as_a_dit(tmp_path, weights, key):
    """A LoRA given where a DiT goes is named as one, with where it goes, not as a DiT missing its tensors."""
    up_key = key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    lora = {key: torch.zeros(4, CONFIG.dim), up_key: torch.zeros(CONFIG.dim, 4)}
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    expected = f"{path}: a LoRA (tensors such as {key!r}), not a DiT checkpoint: merge it into its base model with"
    assert load_error(path).startswith(expected)
    # Among the files of a per-block folder, the LoRA file is the one named.
    folder = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    save_file(lora, str(folder / "lora.safetensors"))
    assert load_error(folder).startswith(f"{folder / 'lora.safetensors'}: a LoRA (tensors such as {key!r}), not a "
                                         f"DiT checkpoint, read as a part of the checkpoint folder {folder}: ")


class _Payload:
    """Unpickled without weights_only, this creates the folder `marker`: code run by loading a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("form", ["zip", "legacy", "top_level"])
def test_a_pth_whose_pickle_would_run_code_is_refused(tmp_path, weights, form):
    marker = tmp_path / "code-ran"
    path = tmp_path / "m.pth"
    obj = _Payload(marker) if form == "top_level" else {**weights, "blocks.0.payload": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=form != "legacy")
    for load in (dit8.load_dit, dit8.checkpoint.open_checkpoint):
        with pytest.raises(CheckpointError) as err:
            load(path)
        # Named as refused for what it calls, not as an unreadable file (it is a torch checkpoint), and
        # without torch's advice to load it with weights_only=False.
        assert re.search(r"m\.pth: refused: .*(posix|os)\.mkdir", str(err.value)), str(err.value)
        assert "weights_only` set to `False`" not in str(err.value)
    assert not marker.exists()


def test_pth_with_a_non_tensor_entry(tmp_path, weights):
    weights["step"] = 3
    path = tmp_path / "m.pth"
    torch.save(weights, path)
    msg = load_error(path)
    assert "'step'" in msg and "m.pth" in msg


def test_pth_nested_state_dict_is_accepted(tmp_path, weights):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": weights}, path)
    assert dit8.load_dit(path).config.num_layers == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.parametrize("given", ["file", "folder"])
def test_a_named_pipe_is_refused_not_waited_on(tmp_path, weights, given):
    import threading

    write_checkpoint(weights, tmp_path / "a.safetensors")
    pipe = tmp_path / "b.safetensors"
    os.mkfifo(pipe)
    result: list[BaseException | None] = []

    def open_it() -> None:
        try:
            dit8.checkpoint.open_checkpoint(pipe if given == "file" else tmp_path)
            result.append(None)
        except BaseException as err:  # (collected, asserted on below)
            result.append(err)

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    thread.join(20)
    waited = thread.is_alive()
    if waited:  # open it for writing and close it, so that the reader sees the end and the thread ends
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(20)
    assert not waited, "open_checkpoint waited on the named pipe"
    assert isinstance(result[0], CheckpointError) and str(result[0]) == (f"{pipe}: not a regular file, where a "
                                                                         f"checkpoint file is expected")


def test_shard_named_in_index_is_missing(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "s", fmt="sharded")
    (path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    assert "diffusion_pytorch_model-00002-of-00003.safetensors" in load_error(path)


def test_key_listed_in_index_but_not_in_its_shard(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "s", fmt="sharded")
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["blocks.0.ghost.weight"] = "diffusion_pytorch_model-00001-of-00003.safetensors"
    index.write_text(json.dumps(raw))
    assert "blocks.0.ghost.weight" in load_error(path)


def test_key_listed_under_a_shard_that_does_not_hold_it(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "s", fmt="sharded")
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    raw = json.loads(index.read_text())
    key, holder = next(iter(raw["weight_map"].items()))
    other = next(name for name in raw["weight_map"].values() if name != holder)
    raw["weight_map"][key] = other
    index.write_text(json.dumps(raw))
    msg = load_error(path)
    assert key in msg and holder in msg and other in msg


def test_same_key_in_two_files(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "pb", fmt="per_block")
    save_file({"head.head.bias": weights["head.head.bias"]}, str(path / "extra.safetensors"))
    msg = load_error(path)
    assert "head.head.bias" in msg and "extra.safetensors" in msg


def test_folder_without_weights(tmp_path):
    assert "no .safetensors" in load_error(tmp_path)


def test_a_diffusers_pipeline_folder_points_at_its_transformer(tmp_path, weights):
    # Its DiT is in transformer/, which the message did not say ("no .safetensors files in this folder").
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    write_checkpoint(weights, tmp_path / "transformer" / "diffusion_pytorch_model.safetensors", layout="diffusers",
                     shards=1)
    assert load_error(tmp_path).endswith(f"(a diffusers pipeline's folder: its DiT is {tmp_path / 'transformer'})")
    with pytest.raises(CheckpointError, match=f"no DiT found .*its DiT is {re.escape(str(tmp_path / 'transformer'))}"
                                              r"\): give it with dit=/--dit, with the official release's"):
        dit8.find_model_files(tmp_path)
    assert dit8.load_dit(tmp_path / "transformer").config.num_layers == tiny_config().num_layers


def test_model_folder_is_not_taken_for_a_dit(tmp_path):
    # A model folder with no .safetensors DiT at its top: only the encoders and VAE, as .pth files.
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        torch.save({"weight": torch.zeros(2)}, tmp_path / name)
    msg = load_error(tmp_path)
    assert "model folder" in msg and "Wan2.1_VAE.pth" in msg and "I2VPipeline" in msg


@pytest.mark.parametrize("name, keys", [
    ("Wan2.1_VAE.pth", ["encoder.conv1.weight", "decoder.head.0.gamma"]),
    # T5's blocks are blocks too: "blocks.N.attn", not a DiT's self_attn
    ("models_t5_umt5-xxl-enc-bf16.pth", ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.norm1.weight"]),
])
def test_an_encoder_file_is_not_taken_for_a_dit(tmp_path, name, keys):
    path = tmp_path / name
    torch.save({key: torch.zeros(2) for key in keys}, path)
    msg = load_error(path)
    assert msg.startswith(f"{path}: not a Wan2.1 DiT checkpoint (no patch_embedding, no DiT blocks") and \
        repr(keys[0]) in msg


def test_config_json_disagreeing_with_shapes(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors", config=tiny_config("i2v", num_layers=3))
    msg = load_error(path)
    assert "config.json" in msg and "num_layers" in msg


def test_config_json_of_the_other_variant(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v"}))
    assert "model_type" in load_error(path)


def test_a_dim_of_no_128_wide_heads_needs_a_config_json(tmp_path):
    """dim 192 with 2 heads of 96: no shape shows the head count, and Wan's 128-wide heads do not divide
    192, so without a config.json it is refused (not guessed as one 192-wide head); with one it loads."""
    config = tiny_config("i2v", dim=192, num_heads=2, num_layers=1)
    path = write_checkpoint(random_weights(config, seed=3), tmp_path / "m.safetensors")
    msg = load_error(path)
    assert msg.startswith(f"{path}: dim 192 is not a multiple of 128") and "config.json with num_heads" in msg
    write_checkpoint(random_weights(config, seed=3), path, config=config)
    assert dit8.load_dit(path).config.num_heads == 2


@pytest.mark.parametrize("config_json", [None, "i2v"])
def test_an_i2v_model_without_the_image_branch_is_not_read_as_t2v(tmp_path, config_json):
    """Wan2.2's I2V-A14B experts: in_dim 36, out_dim 16, the Wan2.1 key names, no img_emb. Not a T2V model,
    nor one whose official config.json ('i2v') disagrees with its weights."""
    config = tiny_config("t2v", in_dim=36)
    path = write_checkpoint(random_weights(config, seed=3), tmp_path / "high_noise_model.safetensors",
                            config=config if config_json else None)
    if config_json:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": config_json, "in_dim": 36, "out_dim": 16}))
    expected = (f"{path}: in_dim 36 and out_dim 16 without an image branch (img_emb), as in Wan2.2's I2V-A14B: "
                f"not a Wan2.1 DiT (I2V ones have img_emb, T2V ones in_dim = out_dim), which is what dit8 runs")
    assert load_error(path) == expected
    with pytest.raises(CheckpointError) as err:  # what `dit8 info` and convert open
        dit8.open_dit(path)
    assert str(err.value) == expected


def test_wan22_ti2v_without_a_config_json_is_refused(tmp_path):
    """Wan2.2's TI2V-5B has Wan2.1's tensor names at 48 latent channels: without a config.json naming its
    model type, the channel count tells it is not a Wan2.1 DiT."""
    config = tiny_config("t2v", in_dim=48, out_dim=48)
    path = write_checkpoint(random_weights(config, seed=3), tmp_path / "m.safetensors")
    expected = (f"{path}: out_dim 48: Wan2.1 DiTs predict the 16 latent channels of Wan2.1's VAE (48 is Wan2.2's "
                f"TI2V-5B): not a model dit8 runs")
    assert load_error(path) == expected
    with pytest.raises(CheckpointError) as err:
        dit8.open_dit(path)
    assert str(err.value) == expected


@pytest.mark.parametrize("model_type", ["ti2v", "flf2v"])
def test_a_config_json_of_another_model_type(tmp_path, model_type):
    """Wan2.2's TI2V-5B (or Wan2.1's FLF2V) beside weights of Wan2.1's shapes: its model type is named as one
    dit8 does not run, not as the other variant of the weights."""
    config = tiny_config("t2v", in_dim=48, out_dim=48)
    path = write_checkpoint(random_weights(config, seed=3), tmp_path / "m.safetensors", config=config)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"model_type": model_type}))
    assert load_error(path) == (f"{tmp_path / 'config.json'}: model_type {model_type!r} is not one dit8 runs: it "
                                f"reads Wan2.1's 'i2v' and 't2v' DiTs")


def test_two_configs_disagreeing_on_what_shapes_cannot_tell(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors", config=tiny_config("i2v"))
    beside = json.loads((tmp_path / "config.json").read_text())
    other = tmp_path / "folder_config.json"
    other.write_text(json.dumps(beside | {"num_heads": 2 * beside["num_heads"]}))
    with pytest.raises(CheckpointError) as err:
        dit8.load_dit(path, config_json=other)
    msg = str(err.value)
    assert msg.startswith(f"{other}: num_heads") and str(tmp_path / "config.json") in msg
    other.write_text(json.dumps(beside))
    assert dit8.load_dit(path, config_json=other).config.num_heads == beside["num_heads"]


@pytest.mark.parametrize("config_json", ["", 3])
def test_a_config_json_argument_that_is_no_path(tmp_path, weights, config_json):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    with pytest.raises(InputError, match=f"^config_json must be a non-empty file or folder path, got {config_json!r}$"):
        dit8.load_dit(path, config_json=config_json)


def test_invalid_config_json(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in load_error(path)


@pytest.mark.parametrize("raw, says", [
    ({"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
      "num_attention_heads": 16, "hidden_size": 1280}, "a transformers model (['CLIPVisionModelWithProjection'])"),
    ({"_class_name": "AutoencoderKLWan", "z_dim": 16, "in_channels": 3}, "a 'AutoencoderKLWan' (its _class_name)"),
])
def test_the_config_json_of_another_model(tmp_path, weights, raw, says):
    """A diffusers folder holding another model's config.json: refused naming it, rather than its head count
    (which no shape contradicts) being taken for the DiT's."""
    path = write_checkpoint(weights, tmp_path / "transformer", layout="diffusers", fmt="sharded")
    (path / "config.json").write_text(json.dumps(raw))
    assert load_error(path) == f"{path / 'config.json'}: the config of {says}, not of a Wan2.1 DiT"


def test_a_diffusers_config_json_is_checked_against_the_weights(tmp_path, weights):
    """diffusers' config.json is told by its names (in_channels alone is enough), its dim is heads x
    attention_head_dim, and its image_dim null (what it writes for T2V) beside I2V weights says nothing."""
    path = write_checkpoint(weights, tmp_path / "transformer", layout="diffusers", fmt="sharded", config=CONFIG)
    raw = json.loads((path / "config.json").read_text())
    assert raw["num_attention_heads"] == 2 and raw["attention_head_dim"] == 128
    for stated, message in [({**raw, "attention_head_dim": 64}, "dim = 128 disagrees with the weights (256)"),
                            ({"in_channels": 16}, "in_dim = 16 disagrees with the weights (36)")]:
        (path / "config.json").write_text(json.dumps(stated))
        assert load_error(path) == f"{path / 'config.json'}: {message}"
    (path / "config.json").write_text(json.dumps({**raw, "image_dim": None}))
    assert dit8.load_dit(path).config == CONFIG


def test_head_count_needed_when_dim_is_not_a_multiple_of_128(tmp_path):
    config = tiny_config("t2v", dim=96, num_heads=4, ffn_dim=160)
    path = write_checkpoint(random_weights(config), tmp_path / "m.safetensors")
    assert "num_heads" in load_error(path)


def test_tensors_are_read_one_at_a_time(tmp_path, weights, monkeypatch):
    """Each tensor read from disk is released before the next is read: memory holds the model plus one."""
    path = write_checkpoint(weights, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    read = Checkpoint.read
    previous: list[weakref.ref] = []

    def tracked(self, key):
        assert not previous or previous[-1]() is None, "the previous tensor is still alive"
        tensor = read(self, key)
        previous.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", tracked)
    dit8.load_dit(path)
    assert len(previous) == len(weights)


def test_loaded_values_equal_the_file(tmp_path, weights):
    model = dit8.load_dit(write_checkpoint(weights, tmp_path / "m.safetensors"))
    state = model.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def _with_header(path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, the data left as it is."""
    def rewrite(header):
        edit(header)
        return json.dumps(header)

    _with_raw_header(path, rewrite)


@pytest.mark.parametrize("problem, message", [
    ("metadata_value", "__metadata__ must map names to strings"),
    ("metadata_string", "__metadata__ must map names to strings"),
    ("aliased_data", "starts at byte"),
])
def test_headers_safetensors_would_refuse(tmp_path, weights, problem, message):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")

    def edit(header):
        if problem == "metadata_value":
            header["__metadata__"] = {"format": 5}
        elif problem == "metadata_string":
            header["__metadata__"] = "pt"
        else:  # two tensors on the same bytes (the file size still adds up)
            first, second = sorted((k for k in header if k != "__metadata__"),
                                   key=lambda k: header[k]["data_offsets"][0])[:2]
            if header[first]["dtype"] == header[second]["dtype"] and \
                    header[first]["shape"] == header[second]["shape"]:
                header[second]["data_offsets"] = header[first]["data_offsets"]
            else:
                header[second]["data_offsets"] = [header[first]["data_offsets"][0],
                                                  header[first]["data_offsets"][0] +
                                                  header[second]["data_offsets"][1] - header[second]["data_offsets"][0]]

    _with_header(path, edit)
    msg = load_error(path)
    assert str(path) in msg and message in msg


@pytest.mark.parametrize("where", ["tensor", "entry", "metadata"])
def test_a_header_giving_a_name_twice_is_corrupt(tmp_path, weights, where):
    # json.loads keeps the last of the two silently; another reader may keep the first (the bytes still add
    # up: both entries describe the same tensor).
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    key = "head.head.bias"

    def make(header: dict) -> str:
        header["__metadata__"] = {"note": "x"}
        text = json.dumps(header)
        if where == "tensor":
            return text[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"
        if where == "entry":
            return text.replace(f'{json.dumps(key)}: {{"dtype": ', f'{json.dumps(key)}: {{"dtype": "I32", "dtype": ')
        return text.replace('{"note": "x"}', '{"note": "x", "note": "y"}')

    _with_raw_header(path, make)
    name = {"tensor": key, "entry": "dtype", "metadata": "note"}[where]
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: corrupt safetensors header: .*"
                                              f"{re.escape(repr(name))} is given twice"):
        dit8.checkpoint.open_checkpoint(path)


@pytest.mark.parametrize("shape", [[2**70, 0], [2**40, 2**40, 0], [0, 2**63]])
def test_a_shape_whose_count_overflows_64_bits_is_corrupt(tmp_path, weights, shape):
    # A zero dimension makes the byte count 0, so the data offsets add up; safetensors and torch cannot hold
    # the shape, which was taken when the file was opened and only failed when the tensor was read.
    path = write_checkpoint(weights, tmp_path / "m.safetensors")

    def make(header: dict) -> str:
        end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
        header["huge"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
        return json.dumps(header)

    _with_raw_header(path, make)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: corrupt header: tensor 'huge' has "
                                              f"shape .*overflows 64 bits"):
        dit8.checkpoint.open_checkpoint(path)


@pytest.mark.parametrize("where", ["metadata", "key"])
def test_a_header_string_with_a_lone_surrogate_is_corrupt(tmp_path, weights, where):
    # safetensors refuses such a header; open_dit (and so `dit8 info` and convert, which reads the tensors
    # without safetensors) took it.
    path = write_checkpoint(weights, tmp_path / "m.safetensors")

    def edit(header):
        if where == "metadata":
            header["__metadata__"] = {"note": "a\udc80b"}
        else:
            header["head.head.bias\ud800"] = header.pop("head.head.bias")

    _with_header(path, edit)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: corrupt safetensors header: "
                                              f"UnicodeEncodeError: .*surrogates not allowed"):
        dit8.open_dit(path)


def test_parts_of_a_folder_that_disagree_on_the_format_version(tmp_path, weights):
    from dit8.converters import convert

    src = write_checkpoint(weights, tmp_path / "src.safetensors")
    out = tmp_path / "packed"
    convert(src, out, scheme="int8", per_block=True, progress=False)
    _with_header(out / "block_0.safetensors", lambda h: h["__metadata__"].update({"dit8.format_version": "2"}))
    msg = load_error(out)
    assert "block_0.safetensors" in msg and "dit8.format_version" in msg


@pytest.mark.parametrize("problem", ["codes_of_another_scheme", "kept_layer_called_8bit", "key_missing",
                                     "unknown_scheme", "config_disagrees", "float_part", "unknown_dtype",
                                     "dtype_disagrees", "unknown_layer_scheme", "float_scheme_over_codes",
                                     "flat_scale"])
def test_packed_header_metadata_must_describe_the_tensors(tmp_path, weights, problem):
    """A packed file's header is checked against its tensors: a file whose FP8 codes were relabelled int8,
    that lacks part of the format's metadata, names an unknown scheme or another configuration, or a
    float part among packed ones, is refused (each loaded as something else before)."""
    from dit8.converters import convert

    src = write_checkpoint(weights, tmp_path / "src.safetensors")
    out = tmp_path / ("packed" if problem == "float_part" else "packed.safetensors")
    convert(src, out, scheme="fp8", per_block=problem == "float_part", progress=False,
            keep=["blocks.0.ffn.0"] if problem == "kept_layer_called_8bit" else ())
    target = out

    def edit(header):
        meta = header["__metadata__"]
        if problem == "codes_of_another_scheme":
            header["blocks.1.ffn.0.weight"]["dtype"] = "I8"
        elif problem == "kept_layer_called_8bit":
            meta["dit8.schemes"] = json.dumps({**json.loads(meta["dit8.schemes"]), "*": "fp8"})
        elif problem == "key_missing":
            del meta["dit8.kept"]
        elif problem == "unknown_scheme":
            meta["dit8.scheme"] = "fp4"
        elif problem == "unknown_dtype":
            meta["dit8.dtype"] = "fp4"
        elif problem == "dtype_disagrees":
            meta["dit8.dtype"] = "fp16"
        elif problem == "config_disagrees":
            meta["dit8.config"] = json.dumps({**json.loads(meta["dit8.config"]), "clip_dim": 999})
        elif problem == "unknown_layer_scheme":  # on a layer kept in bf16: nothing else would notice it
            meta["dit8.schemes"] = json.dumps({"head.head": "fp4", **json.loads(meta["dit8.schemes"])})
        elif problem == "float_scheme_over_codes":
            meta["dit8.scheme"] = "bf16"
        elif problem == "flat_scale":
            header["blocks.1.ffn.0.weight_scale"]["shape"] = header["blocks.1.ffn.0.weight_scale"]["shape"][:1]
        else:
            header["__metadata__"] = {name: v for name, v in meta.items() if not name.startswith("dit8.")}

    if problem == "float_part":
        target = out / "block_1.safetensors"
    _with_header(target, edit)
    match = {"codes_of_another_scheme": "blocks.1.ffn.0.weight is torch.int8, but dit8.schemes gives 'blocks.1.ffn.0' "
                                        "the scheme 'fp8'",
             "kept_layer_called_8bit": "blocks.0.ffn.0.weight is torch.bfloat16 without a weight scale, but "
                                       "dit8.schemes gives 'blocks.0.ffn.0' the scheme 'fp8'",
             "key_missing": r"without the header metadata \['dit8.kept'\]",
             "unknown_scheme": "dit8.scheme is 'fp4'",
             "config_disagrees": r"dit8.config disagrees with the tensors in \['clip_dim'\]",
             "unknown_dtype": r"dit8.dtype is 'fp4', expected one of \('bf16', 'fp16', 'fp32'\)",
             "dtype_disagrees": r"tensor '[\w.]+' is torch.bfloat16, but dit8.dtype says the unquantized tensors "
                                r"are fp16",
             "float_part": "block_1.safetensors: header metadata without",
             "unknown_layer_scheme": r"dit8.schemes names the schemes \['fp4'\], expected only",
             "float_scheme_over_codes": r"dit8.scheme is 'bf16', but the file holds 8-bit weights",
             "flat_scale": rf"blocks.1.ffn.0.weight has blocks.1.ffn.0.weight_scale \({CONFIG.ffn_dim},\) "
                           rf"torch.float32; a dit8.packed file gives each 8-bit weight a "
                           rf"blocks.1.ffn.0.weight_scale of shape \({CONFIG.ffn_dim}, 1\), torch.float32"}[problem]
    msg = load_error(out)
    assert re.search(match, msg) and (str(out) in msg or str(target) in msg), msg


def test_packed_scales_in_another_dtype(tmp_path, weights):
    """The format's scales are fp32: a bf16 one would load, rounded to 8 bits of mantissa, unnoticed."""
    from safetensors import safe_open

    from dit8.converters import convert

    out = tmp_path / "packed.safetensors"
    convert(write_checkpoint(weights, tmp_path / "src.safetensors"), out, scheme="int8", progress=False)
    with safe_open(str(out), "pt") as f:
        tensors, meta = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    tensors["blocks.0.self_attn.o.weight_scale"] = tensors["blocks.0.self_attn.o.weight_scale"].bfloat16()
    save_file(tensors, str(out), metadata=meta)
    assert "blocks.0.self_attn.o.weight_scale" in load_error(out) and "torch.bfloat16" in load_error(out)


def test_shard_index_naming_no_file(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "d", fmt="sharded")
    index = next(path.glob("*.index.json"))
    raw = json.loads(index.read_text())
    raw["weight_map"][next(iter(raw["weight_map"]))] = 5
    index.write_text(json.dumps(raw))
    msg = load_error(path)
    assert index.name in msg and "not a valid shard index" in msg


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "sub/x.safetensors"])
def test_shard_index_naming_a_file_elsewhere(tmp_path, weights, name):
    """Shards are read from beside their index only: a name leading elsewhere is refused before that file
    is opened (a .pth there would be loaded first)."""
    path = write_checkpoint(weights, tmp_path / "d", fmt="sharded")
    index = next(path.glob("*.index.json"))
    raw = json.loads(index.read_text())
    raw["weight_map"][next(iter(raw["weight_map"]))] = name
    index.write_text(json.dumps(raw))
    assert f"shard name {name!r} is not a file name in {path}" in load_error(path)


def test_shard_index_naming_a_file_too_long_for_the_file_system(tmp_path, weights):
    path = write_checkpoint(weights, tmp_path / "d", fmt="sharded")
    index = next(path.glob("*.index.json"))
    raw = json.loads(index.read_text())
    name = "a" * 5000 + ".safetensors"
    raw["weight_map"][next(iter(raw["weight_map"]))] = name
    index.write_text(json.dumps(raw))
    assert load_error(path) == f"{index}: shard name {name!r} cannot be looked up: File name too long"


@pytest.mark.parametrize("stated, message", [
    ({"num_heads": 0}, "num_heads must be a positive integer"),
    ({"num_heads": "two"}, "num_heads must be a positive integer"),
    ({"num_heads": 3}, "not divisible by num_heads 3 (num_heads 3 from"),
    ({"eps": "x"}, "eps must be a number"),
    ({"eps": -1}, "eps must be a number"),
    ({"text_len": -1}, "text_len must be a positive integer"),
    ({"text_len": 10**12}, "text_len 1000000000000 is past the 65,536 text rows taken"),  # not a tokenizer's 8 TB
    ({"patch_size": 5}, "patch_size = 5 disagrees with the weights"),
])
def test_config_json_values_of_the_wrong_kind(tmp_path, weights, stated, message):
    path = write_checkpoint(weights, tmp_path / "m.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(stated))
    msg = load_error(path)
    assert message in msg and "config.json" in msg


def test_a_shape_error_names_where_the_dimensions_came_from(tmp_path, weights):
    # A bad ffn.0.weight sets ffn_dim, and its (good) bias is the tensor found to disagree.
    weights["blocks.0.ffn.0.weight"] = weights["blocks.0.ffn.0.weight"][:-1]
    msg = load_error(write_checkpoint(weights, tmp_path / "m.safetensors"))
    assert "'blocks.0.ffn.0.bias' has shape" in msg and "read from" in msg and "'blocks.0.ffn.0.weight'" in msg


@pytest.mark.parametrize("kind", ["distill_models", "distill_fp8"])
def test_a_model_folder_given_as_a_dit_names_the_dit_inside(tmp_path, kind):
    """A LightX2V model folder's root holds the encoders' .pth files beside the DiT's subfolder: refused as
    a DiT checkpoint, the message names the DiT the pipeline would take from it."""
    from dit8.testing_pipeline import write_tiny_model_folder

    root = write_tiny_model_folder(tmp_path / kind, kind=kind)
    dit = dit8.find_model_files(root).dit
    with pytest.raises(CheckpointError, match=rf"a model folder .*not a DiT checkpoint: pass the DiT file or "
                                              rf"folder \(its DiT: {re.escape(str(dit))}\)"):
        dit8.open_dit(root)
    # A folder too incomplete for the pipeline to tell its DiT is refused as before, without the hint.
    (root / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"not a DiT checkpoint: pass the DiT file or folder, or use"):
        dit8.open_dit(root)
