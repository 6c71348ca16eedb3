"""The executor against the independent float64 reference, for every layout, file format and dtype."""

import pytest
import torch

import dit8
from dit8.testing import FORMATS, LAYOUTS, random_inputs, random_weights, tiny_config, write_checkpoint
from reference_wan import reference_forward

VARIANTS = ("i2v", "t2v")
# CPU always; CUDA as well where a GPU is present (the torch reference ops then run on it).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
FILE_DTYPES = (torch.float32, torch.bfloat16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def case():
    """Per (variant, file dtype): the weights as stored, inputs, and the reference outputs."""
    cache = {}

    def get(variant: str, file_dtype: torch.dtype):
        if (variant, file_dtype) not in cache:
            config = tiny_config(variant)
            stored = {k: v.to(file_dtype) for k, v in random_weights(config, seed=11).items()}
            inputs = random_inputs(config, batch=2, seed=12)
            assert inputs["t"][0] != inputs["t"][1]
            ref = reference_forward(stored, **inputs, num_heads=config.num_heads, text_len=config.text_len)
            ref_bf16 = reference_forward(stored, **inputs, num_heads=config.num_heads, text_len=config.text_len,
                                         matmul_dtype=torch.bfloat16)
            cache[variant, file_dtype] = config, stored, inputs, ref, rel_err(ref_bf16, ref)
        return cache[variant, file_dtype]

    return get


@pytest.mark.parametrize("file_dtype", FILE_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_reference(case, tmp_path, device, variant, layout, fmt, file_dtype):
    config, stored, inputs, ref, ref_bf16_err = case(variant, file_dtype)
    name = "model.pth" if fmt == "pth" else "model.safetensors" if fmt == "safetensors" else "model"
    path = write_checkpoint(stored, tmp_path / name, layout=layout, fmt=fmt, config=config)

    fp32 = dit8.load_dit(path, device=device, dtype=torch.float32)
    assert fp32.config == config
    out = fp32(**inputs)
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device.type == device
    assert rel_err(out.cpu(), ref) < 1e-5  # fp32 compute: the executor's bound (README, "Testing")

    bf16 = dit8.load_dit(path, device=device, dtype=torch.bfloat16)
    err = rel_err(bf16(**inputs).cpu(), ref)
    assert 0 < err <= 2 * ref_bf16_err, (err, ref_bf16_err)


def test_head_count_and_text_len_from_config_json(tmp_path):
    # 96 wide with 4 heads of 24: not Wan's 128-wide heads, so only config.json can say it; RoPE
    # splits 24 channels into 8/8/8 here, which exercises the general split.
    config = tiny_config("i2v", dim=96, num_heads=4, ffn_dim=160, text_len=9)
    weights = random_weights(config, seed=5)
    inputs = random_inputs(config, batch=2, seed=6)
    path = write_checkpoint(weights, tmp_path / "m.safetensors", config=config)
    model = dit8.load_dit(path)
    assert (model.config.num_heads, model.config.text_len) == (4, 9)
    ref = reference_forward(weights, **inputs, num_heads=4, text_len=9)
    assert rel_err(model(**inputs), ref) < 1e-5


def test_batch_rows_are_independent(tmp_path):
    config = tiny_config("i2v")
    model = dit8.load_dit(write_checkpoint(random_weights(config), tmp_path / "m.safetensors", config=config))
    inputs = random_inputs(config, batch=2)
    both = model(**inputs)
    for row in range(2):
        alone = model(**{k: v[row:row + 1] for k, v in inputs.items()})
        assert rel_err(alone, both[row:row + 1]) < 1e-6  # fp32: only the matmuls' blocking may differ


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_norm_epsilons_at_activations_of_their_size(tmp_path, eps):
    # With activations of O(1) an eps of 1e-5 for 1e-6 moves a norm's output by ~5e-6, within the parity
    # bound. Here the residual stream (patch embedding and the three output projections scaled down),
    # the q/k projections that the RMSNorms take, the CLIP features and img_emb's inner activation are
    # ~1e-3: each norm's eps then counts. The blocks' LayerNorms and q/k RMSNorms and the head's norm take
    # the model's eps (config.json's), img_emb's two LayerNorms 1e-5 always.
    config = tiny_config("i2v", eps=eps)
    weights = random_weights(config, seed=21)
    scaled = ("self_attn.o", "cross_attn.o", "ffn.2", "self_attn.q", "self_attn.k", "cross_attn.q", "cross_attn.k",
              "cross_attn.k_img")
    small = ("patch_embedding.", "img_emb.proj.3.") + tuple(f"blocks.{n}.{m}." for n in range(config.num_layers)
                                                         for m in scaled)
    for key in weights:
        if key.startswith(small):
            weights[key] *= 1e-3
    inputs = random_inputs(config, batch=2, seed=22)
    inputs["clip_fea"] *= 3e-3
    model = dit8.load_dit(write_checkpoint(weights, tmp_path / "m.safetensors", config=config))
    assert model.config.eps == eps
    ref = reference_forward(weights, **inputs, num_heads=config.num_heads, eps=eps, text_len=config.text_len)
    assert rel_err(model(**inputs), ref) < 1e-5
