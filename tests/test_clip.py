"""CLIP vision tower: against transformers' CLIPVisionModel with the same random weights (fp32, relative
error <= 1e-4), loading from Wan/open-clip key names with the unused parts skipped and errors naming file
and key, and the preprocessing of spec/pipeline.md (bicubic to 224, no crop, CLIP mean/std)."""

import pytest
import torch
import torch.nn.functional as F

from dit8 import CheckpointError, InputError
from dit8.clip import CLIP_MEAN, CLIP_STD, CLIPVisionEncoder
from dit8.testing_encoders import random_clip_weights, tiny_clip_config, write_tiny_clip

TOLERANCE = 1e-4
# A head count other than the default 16, passed explicitly (the file does not record it).
CONFIG = tiny_clip_config(dim=48, mlp_dim=96, num_heads=4, num_layers=4)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def weights():
    return random_clip_weights(CONFIG, seed=4)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return write_tiny_clip(folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", CONFIG, seed=4)


@pytest.fixture(scope="module")
def model(clip_path):
    return CLIPVisionEncoder.from_pth(clip_path, device="cpu", dtype=torch.float32, num_heads=CONFIG.num_heads)


def images(batch=2, height=200, width=320, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


# -- key names and loading -------------------------------------------------------------------------------


def test_keys_are_wans_and_unused_parts_skipped(model, weights):
    last = f"visual.transformer.{CONFIG.num_layers - 1}."
    used = {k[len("visual."):] for k in weights if k.startswith("visual.")
            and not k.startswith(last) and not k.startswith("visual.post_norm.") and k != "visual.head"}
    assert set(model.state_dict()) == used
    assert len(model.transformer) == CONFIG.num_layers - 1
    assert any(k.startswith("textual.") for k in weights) and "log_scale" in weights  # present in the file


def test_config_read_from_shapes(model):
    assert model.config == CONFIG


def test_what_the_file_does_not_record_is_vit_h14s(tmp_path):
    """The head count and the LayerNorm eps are not in the weights: loaded without them, the tower takes
    ViT-H/14's 16 heads (spec/pipeline.md) and OpenAI CLIP's eps. The parity tests below pass their own
    head count, so only this test sees the defaults."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    vit_h = tiny_clip_config(num_heads=16)  # dim 32: 8 or 4 heads would divide it too
    path = write_tiny_clip(tmp_path / "clip.pth", vit_h, seed=5)
    model = CLIPVisionEncoder.from_pth(path, device="cpu", dtype=torch.float32)
    assert model.config.eps == transformers.CLIPVisionConfig().layer_norm_eps
    pixels = model.preprocess(images(batch=1))
    out = model(pixels)
    assert out.shape == (1, 257, vit_h.dim)
    ref = hf_penultimate(hf_clip(random_clip_weights(vit_h, seed=5), vit_h), pixels, vit_h.num_layers)
    assert rel_error(out, ref) <= TOLERANCE


def test_loads_half_file_into_bf16(tmp_path, model):
    path = write_tiny_clip(tmp_path / "clip_fp16.pth", CONFIG, seed=4, dtype=torch.float16)
    low = CLIPVisionEncoder.from_pth(path, device="cpu", dtype=torch.bfloat16, num_heads=CONFIG.num_heads)
    x = images()
    out = low.encode(x)
    assert out.dtype == torch.bfloat16 and low.pre_norm.weight.dtype == torch.float32
    assert rel_error(out, model.encode(x)) < 5e-2


def load_error(weights, path) -> str:
    torch.save(weights, path)
    with pytest.raises(CheckpointError) as info:
        CLIPVisionEncoder.from_pth(path, device="cpu", dtype=torch.float32, num_heads=CONFIG.num_heads)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_tensor_named(tmp_path, weights):
    w = dict(weights)
    del w["visual.transformer.1.attn.proj.bias"]
    assert "visual.transformer.1.attn.proj.bias" in load_error(w, tmp_path / "clip.pth")


def test_unexpected_tensor_named(tmp_path, weights):
    msg = load_error({**weights, "visual.transformer.0.attn.extra": torch.zeros(3)}, tmp_path / "clip.pth")
    assert "visual.transformer.0.attn.extra" in msg and "unexpected" in msg


def test_misshaped_tensor_named(tmp_path, weights):
    msg = load_error({**weights, "visual.transformer.2.mlp.2.bias": torch.zeros(CONFIG.dim + 1)}, tmp_path / "clip.pth")
    assert "visual.transformer.2.mlp.2.bias" in msg and "shape" in msg


def test_text_only_file_refused(tmp_path, weights):
    text = {k: v for k, v in weights.items() if not k.startswith("visual.")}
    assert "not a Wan CLIP checkpoint" in load_error(text, tmp_path / "clip.pth")
    no_patch = {k: v for k, v in weights.items() if k != "visual.patch_embedding.weight"}
    assert "visual.patch_embedding.weight" in load_error(no_patch, tmp_path / "clip.pth")


def test_a_layout_that_does_not_fit_is_a_checkpoint_error(tmp_path, weights):
    one_block = {k: v for k, v in weights.items() if not k.startswith("visual.transformer.")
                 or k.startswith("visual.transformer.0.")}  # no penultimate block to take
    assert "the penultimate block needs at least 2" in load_error(one_block, tmp_path / "clip.pth")
    flat = {**weights, "visual.patch_embedding.weight": weights["visual.patch_embedding.weight"].flatten(2)}
    assert "not a CLIP vision tower of the expected layout" in load_error(flat, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="image_size 225 is not a multiple of patch_size 14"):
        tiny_clip_config(image_size=225)


def test_a_vit_h14_tower_missing_its_last_blocks_is_refused(tmp_path):
    # Which block is the penultimate one comes from the file's highest block index: ViT-H/14 without its
    # last block would give block 29's output as if it were block 30's. Only the shapes the count check
    # reads are real here; every block is one stand-in tensor.
    def tower(blocks: int) -> dict:
        return {"visual.patch_embedding.weight": torch.zeros(1280, 3, 14, 14),
                "visual.pos_embedding": torch.zeros(1, 257, 1280),
                **{f"visual.transformer.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)}}

    msg = load_error(tower(31), tmp_path / "clip31.pth")
    assert "(ViT-H/14) has 32 blocks (visual.transformer.0-31); this one has 31" in msg
    assert "has 32 blocks" not in load_error(tower(32), tmp_path / "clip32.pth")  # refused later, for its tensors


# -- preprocessing --------------------------------------------------------------------------------------


def test_normalisation_is_openai_clips():
    # The preprocessing tests use our own constants; transformers holds OpenAI CLIP's independently.
    constants = pytest.importorskip("transformers.utils.constants",
                                    reason="transformers (test-only) is not installed")
    assert list(CLIP_MEAN) == list(constants.OPENAI_CLIP_MEAN)
    assert list(CLIP_STD) == list(constants.OPENAI_CLIP_STD)


def test_preprocess_constant_image_is_normalised_exactly(model):
    value = 0.3
    pixels = model.preprocess(torch.full((1, 3, 90, 130), value))
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    for c in range(3):
        expected = ((value + 1) / 2 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(pixels[0, c], torch.full((224, 224), expected), atol=1e-5)


def test_preprocess_resizes_the_whole_image_without_crop(model):
    # A horizontal ramp over a wide image: with no crop the output's edges keep the image's edges.
    ramp = torch.linspace(-1, 1, 448).expand(1, 3, 112, 448)
    pixels = model.preprocess(ramp)
    unit = pixels * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert unit[..., 0].max() < 0.01 and unit[..., -1].min() > 0.99  # a centre crop would give ~0.25/0.75


def test_preprocess_is_bicubic_of_the_unit_image(model):
    x = images()
    expected = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False) * 0.5 + 0.5
    expected = (expected - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(model.preprocess(x), expected, atol=1e-6)


def test_bad_inputs(model):
    with pytest.raises(InputError):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(InputError, match="images must be a float tensor"):  # 0..255 bytes are not in [-1, 1]
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError):
        model(torch.zeros(1, 3, 112, 112))
    for shape in ((0, 3, 32, 32), (1, 3, 0, 32)):
        with pytest.raises(InputError, match="at least one image of at least one pixel"):
            model.encode(torch.zeros(shape))
    with pytest.raises(InputError, match=r"pixels have shape \(0, 3, 224, 224\)"):
        model(torch.zeros(0, 3, 224, 224))
    with pytest.raises(InputError, match="pixels must be a tensor"):
        model([[0.0]])


# -- against transformers' CLIPVisionModel ---------------------------------------------------------------


def hf_clip(weights, config=CONFIG):
    transformers = pytest.importorskip("transformers", reason="transformers (test-only) is not installed")
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=config.dim, intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, image_size=config.image_size, patch_size=config.patch_size,
        num_channels=3, hidden_act="gelu", layer_norm_eps=config.eps, attention_dropout=0.0,
        attn_implementation="eager")
    hf = transformers.CLIPVisionModel(hf_config).eval()
    v = {k[len("visual."):]: t for k, t in weights.items() if k.startswith("visual.")}
    mapped = {"embeddings.patch_embedding.weight": v["patch_embedding.weight"],
              "embeddings.class_embedding": v["cls_embedding"].reshape(-1),
              "embeddings.position_embedding.weight": v["pos_embedding"][0],
              "pre_layrnorm.weight": v["pre_norm.weight"], "pre_layrnorm.bias": v["pre_norm.bias"],
              "post_layernorm.weight": v["post_norm.weight"], "post_layernorm.bias": v["post_norm.bias"]}
    for i in range(config.num_layers):
        ours, theirs = f"transformer.{i}.", f"encoder.layers.{i}."
        # to_qkv packs q, k, v along the output rows, in that order.
        for part in ("weight", "bias"):
            q, k, vv = v[f"{ours}attn.to_qkv.{part}"].chunk(3, dim=0)
            mapped.update({f"{theirs}self_attn.q_proj.{part}": q, f"{theirs}self_attn.k_proj.{part}": k,
                           f"{theirs}self_attn.v_proj.{part}": vv,
                           f"{theirs}self_attn.out_proj.{part}": v[f"{ours}attn.proj.{part}"],
                           f"{theirs}layer_norm1.{part}": v[f"{ours}norm1.{part}"],
                           f"{theirs}layer_norm2.{part}": v[f"{ours}norm2.{part}"],
                           f"{theirs}mlp.fc1.{part}": v[f"{ours}mlp.0.{part}"],
                           f"{theirs}mlp.fc2.{part}": v[f"{ours}mlp.2.{part}"]})
    # Older transformers nest the tower under `vision_model.`.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    hf.load_state_dict({prefix + k: t for k, t in mapped.items()}, strict=True)
    return hf


def hf_penultimate(hf, pixels, num_layers):
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
    hidden = out.hidden_states
    # hidden_states[i] is the state after i blocks, [0] being the pre-normed embeddings; so "the first
    # num_layers - 1 blocks, no post-norm" is hidden_states[num_layers - 1] == hidden_states[-2].
    assert len(hidden) == num_layers + 1 and torch.equal(hidden[-1], out.last_hidden_state)
    return hidden[num_layers - 1]


def test_matches_transformers_penultimate_block(model, weights):
    hf = hf_clip(weights)
    pixels = model.preprocess(images(batch=3, seed=1))
    ref = hf_penultimate(hf, pixels, CONFIG.num_layers)
    out = model(pixels)
    assert out.shape == (3, CONFIG.num_tokens, CONFIG.dim) == (3, 257, CONFIG.dim)
    assert rel_error(out, ref) <= TOLERANCE
    # and it is not the last block's output
    with torch.no_grad():
        last = hf(pixel_values=pixels).last_hidden_state
    assert rel_error(out, last) > 1e-2


def test_encode_matches_transformers_on_wan_preprocessing(model, weights):
    hf = hf_clip(weights)
    x = images(batch=2, height=480, width=832, seed=2)
    pixels = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert rel_error(model.encode(x), hf_penultimate(hf, pixels, CONFIG.num_layers)) <= TOLERANCE
