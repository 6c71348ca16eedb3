"""WanDiT structure, input checks, the context cache and the RoPE table cache."""

import gc
import re
import traceback
import weakref

import pytest
import torch
import torch.nn.functional as F

import dit8
from dit8 import InputError, WanDiT
from dit8.layouts import expected_shapes
from dit8.testing import random_inputs, random_weights, tiny_config, write_checkpoint


@pytest.mark.parametrize("variant", ["i2v", "t2v"])
def test_state_dict_is_the_official_checkpoint(variant):
    config = tiny_config(variant)
    state = WanDiT(config).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(config)


def test_dtypes_follow_the_official_numerics():
    state = WanDiT(tiny_config("i2v"), dtype=torch.bfloat16).state_dict()
    assert state["blocks.0.self_attn.q.weight"].dtype == torch.bfloat16
    assert state["patch_embedding.weight"].dtype == torch.bfloat16
    for fp32 in ("blocks.0.modulation", "head.head.weight", "head.modulation", "time_embedding.0.weight",
                 "time_projection.1.weight", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight"):
        assert state[fp32].dtype == torch.float32, fp32


def test_time_embedding_residual_stream_and_head_compute_in_fp32_in_a_bf16_model(tmp_path):
    # Official: the time embedding and projection, the gated residual adds and the head run in fp32
    # while the block matmuls are bf16. Each is held here to fp32's error against float64 (a bf16
    # rounding anywhere on these paths would be ~1e-3).
    from dit8.model import sinusoidal_embedding

    config = tiny_config("i2v")
    weights = random_weights(config, seed=3)
    model = dit8.load_dit(write_checkpoint(weights, tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    w = {k: v.double() for k, v in weights.items()}

    def linear(name, x):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def rel_err(a, b):
        assert a.dtype == torch.float32
        return ((a.double() - b).norm() / b.norm()).item()

    s = sinusoidal_embedding(torch.tensor([999.0, 20.0]), config.freq_dim)
    e = model.time_embedding(s)
    e64 = linear("time_embedding.2", F.silu(linear("time_embedding.0", s.double())))
    assert rel_err(e, e64) < 1e-5
    e0 = model.time_projection(e).unflatten(1, (6, config.dim))
    e0_64 = linear("time_projection.1", F.silu(e64)).unflatten(1, (6, config.dim))
    assert rel_err(e0, e0_64) < 1e-5

    h = torch.randn(2, 12, config.dim) * 3 + 1
    shift, scale = (w["head.modulation"] + e64[:, None]).unbind(1)
    normed = F.layer_norm(h.double(), (config.dim,), eps=config.eps)
    assert rel_err(model.head(h, e), linear("head.head", normed * (1 + scale[:, None]) + shift[:, None])) < 1e-5

    # The residual stream stays fp32 through a block: with both gates zero (e0's gate entries set to
    # the negated modulation) and cross-attention's o zeroed, every add is x + 0 and the stream comes out bit
    # for bit; any rounding to the compute dtype on the way would change it.
    block = model.blocks[0]
    block.cross_attn.o.weight.zero_()
    block.cross_attn.o.bias.zero_()
    gates = e0.clone()
    gates[:, 2::3] = -block.modulation[:, 2::3]
    kv = model.encode_context(torch.randn(2, 3, config.text_dim), torch.randn(2, 5, config.clip_dim)).blocks[0]
    out = block(h, gates, model.positions((2, 2, 3)), kv)
    assert out.dtype == torch.float32 and torch.equal(out, h)


def test_an_8bit_linear_adds_to_the_fp32_residual_stream_in_a_bf16_model():
    # Official: the gated residual add is fp32 whatever the matmul dtype. A W8A8 o or ffn.2 does it in its
    # GEMM's epilogue, which must write fp32: a bf16 result would round the whole stream at every block.
    from dit8.layers import QuantLinear, Setup

    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(64, 32, Setup(torch.device("cpu"), torch.bfloat16, "auto"), torch.int8)
    layer.weight.copy_(torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8))
    layer.weight_scale.fill_(1e-3)
    layer.bias.zero_()
    residual = torch.randn(2, 3, 32, generator=gen, dtype=torch.float64).float() * 100  # not bf16 values
    out = layer(torch.randn(2, 3, 64, generator=gen).bfloat16(), residual, torch.zeros(2, 32))
    assert out.dtype == torch.float32 and torch.equal(out, residual)  # residual + y · 0, bit for bit


def test_a_norm_quantizes_its_output_only_for_linears_of_one_8bit_dtype():
    # norm1 feeds q, k and v: it quantizes once for them only where all three hold weights of the same
    # 8-bit dtype; otherwise each linear takes its input as it is (float rows to a float linear).
    from dit8.layers import Setup

    int8, fp8 = torch.int8, torch.float8_e4m3fn
    setup = Setup(torch.device("cpu"), torch.float32, "auto", {"q": int8, "k": int8, "v": fp8})
    assert setup.input_quantization("q", "k") == int8
    assert setup.input_quantization("q", "k", "v") is None and setup.input_quantization("q", "o") is None
    # A block whose q alone is 8-bit runs (its k and v are float linears given the norm's float rows).
    config = tiny_config("t2v", num_layers=1)
    model = WanDiT(config, quantized={"blocks.0.self_attn.q": int8})
    assert model.blocks[0].norm1.quantize_to is None
    gen = torch.Generator().manual_seed(0)
    for buffer in model.buffers():
        if buffer.dtype == int8:
            buffer.copy_(torch.randint(-127, 128, buffer.shape, generator=gen, dtype=int8))
        else:
            buffer.copy_(torch.rand(buffer.shape, generator=gen) * 0.02)
    inputs = random_inputs(config)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


def test_time_sinusoid_is_cos_first_and_float64():
    from dit8.model import sinusoidal_embedding

    # Timesteps near 1000 turn the lowest frequency by ~1000 radians: an fp32 product t·f would be
    # ~1e-4 off there. Official: [cos(t·f), sin(t·f)], f_j = 10000^(-j/128) for width 256, in float64.
    t = torch.tensor([999.9, 731.3, 0.0, 1.7])
    out = sinusoidal_embedding(t, 256)
    assert out.shape == (4, 256) and out.dtype == torch.float32
    angles = t.double()[:, None] * 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    torch.testing.assert_close(out.double(), torch.cat([angles.cos(), angles.sin()], 1), atol=2.0 ** -24, rtol=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny_config("i2v")
    path = write_checkpoint(random_weights(config), tmp_path_factory.mktemp("m") / "m.safetensors")
    return dit8.load_dit(path)


def test_encoded_context_gives_the_same_output(model):
    inputs = random_inputs(model.config)
    encoded = model.encode_context(inputs["context"], inputs["clip_fea"])
    assert len(encoded.blocks) == model.config.num_layers
    torch.testing.assert_close(model(inputs["x"], inputs["t"], encoded, y=inputs["y"]), model(**inputs),
                               rtol=0, atol=0)


def test_an_encoded_context_saves_and_loads(model, tmp_path):
    # A service may cache encoded prompts (torch.save) or pass them between processes (pickle).
    inputs = random_inputs(model.config)
    encoded = model.encode_context(inputs["context"], inputs["clip_fea"])
    torch.save(encoded, tmp_path / "context.pt")
    # (weights_only=True with its two classes allowed, as README says; the default refuses any class.)
    with torch.serialization.safe_globals([dit8.EncodedContext, dit8.model.CrossKV]):
        loaded = torch.load(tmp_path / "context.pt", weights_only=True)
    assert loaded.model is None and encoded.model() is model  # the saved copy has no model to hold to
    torch.testing.assert_close(model(inputs["x"], inputs["t"], loaded, y=inputs["y"]),
                               model(inputs["x"], inputs["t"], encoded, y=inputs["y"]), rtol=0, atol=0)


def test_a_failed_forwards_exception_holds_none_of_its_activations(model, monkeypatch):
    # A caller that keeps it (or runs another forward inside its except block, after running out of
    # memory) does not keep the failed forward's hidden states alive.
    inputs, seen = random_inputs(model.config), []

    def failing(h, *args):
        seen.append(weakref.ref(h))
        raise RuntimeError("out of memory (a stand-in)")

    monkeypatch.setattr(model.blocks[1], "forward", failing)
    with pytest.raises(RuntimeError, match="a stand-in") as info:
        model(inputs["x"], inputs["t"], inputs["context"], clip_fea=inputs["clip_fea"], y=inputs["y"])
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    assert "in forward" in "".join(traceback.format_exception(info.value))


def test_an_encoded_context_of_another_model_is_refused(model):
    inputs = random_inputs(model.config)
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    shallow = WanDiT(tiny_config("i2v", num_layers=1))
    t2v = WanDiT(tiny_config("t2v", num_layers=model.config.num_layers))
    for other, match in [(shallow, "has 1 blocks; this model has 2"), (t2v, "lacks image keys; this model is i2v")]:
        encoded = other.encode_context(inputs["context"], inputs["clip_fea"] if other.config.is_i2v else None)
        with pytest.raises(InputError, match=match):
            model(x, t, encoded, y=y)
    encoded = model.encode_context(inputs["context"], inputs["clip_fea"])
    with pytest.raises(InputError, match="clip_fea goes to encode_context"):
        model(x, t, encoded, inputs["clip_fea"], y=y)
    # A model of the same shapes but other weights (another file, scheme or LoRA).
    twin = WanDiT(model.config)
    with pytest.raises(InputError, match="made by another model's encode_context"):
        twin(x, t, encoded, y=y)


def test_rope_table_is_built_once_per_grid(model, monkeypatch):
    import dit8.model

    built = []
    real = dit8.model.rope_table
    monkeypatch.setattr(dit8.model, "rope_table", lambda *a, **k: built.append(a) or real(*a, **k))
    model._positions.clear()
    for size in [(2, 4, 6), (2, 4, 6), (3, 4, 6)]:
        model(**random_inputs(model.config, latent_size=size))
    assert [a[0] for a in built] == [(2, 2, 3), (3, 2, 3)]


def test_rope_tables_are_kept_for_the_last_grids_used(model):
    from dit8.model import POSITION_TABLES_KEPT

    model._positions.clear()
    grids = [(1, 1, n) for n in range(1, POSITION_TABLES_KEPT + 1)]
    first = [model.positions(g) for g in grids]
    assert model.positions(grids[0]) is first[0]  # reused, and now the most recently used
    model.positions((2, 1, 1))  # one grid too many: the least recently used one goes
    assert list(model._positions) == grids[2:] + [grids[0], (2, 1, 1)]
    again = model.positions(grids[1])  # built anew, equal to what it was
    assert again is not first[1] and torch.equal(again.cos, first[1].cos) and torch.equal(again.sin, first[1].sin)
    assert len(model._positions) == POSITION_TABLES_KEPT


@pytest.mark.slow
def test_a_compiled_forward_breaks_only_at_the_cpu_input_value_checks(model):
    """torch.compile of the forward: its only graph breaks are the value checks of CPU inputs (NaN, Inf,
    t's range: data-dependent, and skipped for GPU tensors). The RoPE table cache's lock was one more,
    on every device, which fullgraph=True refused. The compiled forward gives eager's result, and a
    second call of the same shapes compiles nothing more."""
    import torch._dynamo.testing

    inputs = random_inputs(model.config, latent_size=(2, 4, 6), seed=61)
    with torch.inference_mode():
        expected = model(**inputs)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(**inputs)
        checks = ("_check_finite", "_check_inputs")
        outside = [r.reason.splitlines()[0] for r in explanation.break_reasons
                   if not any(check in frame.name for frame in r.user_stack for check in checks)]
        assert not outside, outside
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter)
        assert torch.equal(compiled(**inputs), expected)
        frames = counter.frame_count
        assert torch.equal(compiled(**inputs), expected) and counter.frame_count == frames
    torch._dynamo.reset()


def test_the_kept_rope_tables_take_forwards_from_several_threads(model, monkeypatch):
    # One model run from several threads (two pipelines over the same loaded models): two threads
    # evicting the same oldest grid raised KeyError, or "dictionary changed size during iteration".
    import sys
    import threading

    import dit8.model
    from dit8.model import POSITION_TABLES_KEPT

    table = (torch.zeros(1, 1), torch.zeros(1, 1))
    monkeypatch.setattr(dit8.model, "rope_table", lambda *a, **k: table)  # cheap: the cache's own work only
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as long forwards make them
    errors = []

    def run(k):
        for i in range(6000):
            try:
                model.positions((1 + (7 * i + k) % (2 * POSITION_TABLES_KEPT + 1), 1, 1))
            except Exception as err:
                errors.append(repr(err))

    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    model._positions.clear()
    assert errors == []


@pytest.mark.parametrize("change, match", [
    (lambda i: i.update(x=i["x"][:, :4]), "x has shape"),
    (lambda i: i.update(x=i["x"][..., :5], y=i["y"][..., :5]), "multiples of the patch"),
    (lambda i: i.update(t=i["t"][:1]), "t must be"),
    (lambda i: i.update(t=torch.tensor([2000.0, 5.0])), r"t must be timesteps in \[0, 1000\]"),
    (lambda i: i.update(t=torch.tensor([float("nan"), 5.0])), r"t must be timesteps in \[0, 1000\]"),
    (lambda i: i.pop("y"), "y .* required"),
    (lambda i: i.update(y=i["y"][:, :3]), "y has shape"),
    (lambda i: i.pop("clip_fea"), "clip_fea is required"),
    (lambda i: i.update(clip_fea=i["clip_fea"][..., :7]), "clip_fea has shape"),
    (lambda i: i.update(context=torch.randn(2, 513, 64)), "at most text_len"),
    (lambda i: i.update(context=i["context"][:1], clip_fea=i["clip_fea"][:1]), "batch"),
    (lambda i: i.update(context=i["context"][:1]), "context has batch 1 but x has batch 2"),
    (lambda i: i.update(context=i["context"].numpy()), "context must be a floating-point tensor, got ndarray"),
    (lambda i: i.update(clip_fea=i["clip_fea"][:, :0]), "clip_fea has no tokens"),
    (lambda i: i.update(x=i["x"][:, :, :0], y=i["y"][:, :, :0]), "not positive multiples of the patch"),
    (lambda i: i.update(x=torch.randn(2, 16, 1, 2, 2050), y=torch.randn(2, 20, 1, 2, 2050)),
     r"patch grid of \(1, 1, 1025\).*covers 1024"),
    (lambda i: i.update(t=torch.tensor([True, False])), "t must be real timesteps"),
    (lambda i: i["x"].view(-1)[7].fill_(float("nan")), "x contains NaN values"),
    (lambda i: i["y"].view(-1)[7].fill_(float("inf")), "y contains Inf values"),
    (lambda i: i["context"].view(-1)[7].fill_(float("-inf")), "context contains Inf values"),
    (lambda i: i["clip_fea"].view(-1)[7].fill_(float("nan")), "clip_fea contains NaN values"),
    # y of another batch than x, and a context without its batch dimension, are named by their shapes
    # (rather than failing inside torch.cat or the unpacking of the context's shape).
    (lambda i: i.update(y=i["y"][:1]), r"y has shape \(1, 20, 2, 4, 6\); expected \(2, 20, 2, 4, 6\)"),
    (lambda i: i.update(context=i["context"][0]), r"context has shape \(7, 64\); expected \('\*', '\*', 64\)"),
    # Meta tensors hold no values: moving them to the model's device failed inside torch, naming no input.
    *[(lambda i, name=name: i.update({name: i[name].to("meta")}), f"^{name} is a meta tensor, which holds no values")
      for name in ("x", "t", "context", "clip_fea", "y")],
])
def test_bad_inputs_raise_input_error(model, change, match):
    inputs = random_inputs(model.config)
    change(inputs)
    with pytest.raises(InputError, match=match):
        model(**inputs)


def test_an_encoded_context_of_another_batch_is_refused(model):
    # Keys and values encoded for one prompt, given with latents of two: named as the context, not as a
    # kernel argument (cross_attention's k) deep in the first block.
    inputs = random_inputs(model.config)
    encoded = model.encode_context(inputs["context"][:1], inputs["clip_fea"][:1])
    with pytest.raises(InputError, match="^context has batch 1 but x has batch 2$"):
        model(inputs["x"], inputs["t"], encoded, y=inputs["y"])


def test_the_ends_of_the_input_ranges_are_taken(model):
    # Timesteps 0 and 1000 are both in [0, 1000]; a context of exactly text_len rows needs no padding.
    inputs = random_inputs(model.config, text_rows=model.config.text_len)
    inputs["t"] = torch.tensor([0.0, 1000.0])
    out = model(**inputs)
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


def test_float64_inputs_are_taken_as_float32(model):
    inputs = random_inputs(model.config)
    doubled = {k: v.double() for k, v in inputs.items()}
    torch.testing.assert_close(model(**doubled), model(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["x", "y", "context", "clip_fea"])
def test_float64_inputs_past_float32_are_refused(model, name):
    # Finite in float64, Inf once converted to the model's fp32: the velocity came out NaN, without a word.
    inputs = {k: v.double() for k, v in random_inputs(model.config).items()}
    inputs[name].view(-1)[7] = -1e300
    with pytest.raises(InputError, match=f"^{name} has values past the range of float32"):
        model(**inputs)


def test_context_past_an_fp16_models_range_is_refused(tmp_path):
    # The text context is padded in the compute dtype: 1e5, finite in fp32, was Inf in an fp16 model.
    config = tiny_config("i2v")
    path = write_checkpoint(random_weights(config), tmp_path / "m.safetensors")
    fp16 = dit8.load_dit(path, dtype=torch.float16)
    inputs = random_inputs(config)
    assert fp16(**inputs).isfinite().all()
    inputs["context"].view(-1)[7] = 1e5
    with pytest.raises(InputError, match=r"^context has values past the range of float16, which the model "
                                         r"computes it in \(magnitudes above 6\.55e\+04\)"):
        fp16(**inputs)
    with pytest.raises(InputError, match="^context has values past the range of float16"):
        fp16.encode_context(inputs["context"], inputs["clip_fea"])


def test_t2v_refuses_image_inputs():
    config = tiny_config("t2v")
    model = WanDiT(config)
    inputs = random_inputs(config)
    with pytest.raises(InputError, match="T2V"):
        model(**inputs, y=torch.randn(2, 20, 2, 4, 6))


def test_attention_choice_is_checked_when_the_model_is_built():
    with pytest.raises(InputError, match="attention must be one of"):
        WanDiT(tiny_config("i2v"), attention="int4")
    # The 8-bit paths have no torch reference; on CPU tensors "auto" means the reference.
    with pytest.raises(dit8.kernels.BackendError, match="no torch reference"):
        WanDiT(tiny_config("i2v"), attention="int8")
    with pytest.raises(dit8.kernels.BackendError, match="unknown backend"):
        WanDiT(tiny_config("i2v"), attention="fp8", backend="cudnn")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float64, "bf16"], ids=str)
def test_compute_dtype_is_checked(dtype):
    with pytest.raises(InputError, match="dtype .* must be one of .*bfloat16"):
        WanDiT(tiny_config("i2v"), dtype=dtype)


def test_devices_are_checked_by_name():
    from dit8.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(InputError, match="'mps': dit8 runs on cpu or cuda"):
        resolve_device("mps")
    with pytest.raises(InputError, match="dit8 runs on cpu or cuda"):
        resolve_device("meta")  # holds no data: a run on it would fail deep inside
    for bad in (None, 0.5):  # not a name at all: torch raises TypeError
        with pytest.raises(InputError, match=f"device {bad!r} is not a device name"):
            resolve_device(bad)


def test_cuda_devices_are_checked_against_the_machine(monkeypatch):
    from dit8.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(InputError, match=r"'cuda': CUDA is not available here \(torch was built without CUDA\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(InputError, match=r"'cuda': CUDA is not available here \(no CUDA GPU is visible\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(InputError, match=r"'cuda:2': this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_a_kernel_backend_no_op_runs_here_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton needs a GPU
    with pytest.raises(dit8.kernels.BackendError, match="backend 'triton': no op can run its kernels on cpu"):
        WanDiT(tiny_config("i2v"), backend="triton")
    # Each says why: the interpreter for Triton on CPU tensors, CUDA tensors for the CUDA kernels.
    with pytest.raises(dit8.kernels.BackendError, match=r"cpu tensors here \(on CPU tensors the Triton kernels run "
                                                         r"only in the interpreter: TRITON_INTERPRET=1"):
        WanDiT(tiny_config("i2v"), backend="triton")
    with pytest.raises(dit8.kernels.BackendError, match=r"backend 'cuda': no op can run its kernels on cpu tensors "
                                                         r"here \(the CUDA kernels take CUDA tensors, not cpu ones\)"):
        WanDiT(tiny_config("i2v"), backend="cuda")


def test_8bit_attention_on_the_torch_backend_is_refused_when_built():
    with pytest.raises(dit8.kernels.BackendError, match="torch reference has no 'int8' path"):
        WanDiT(tiny_config("i2v"), attention="int8", backend="torch")


def test_the_model_does_not_move_after_it_is_built(model):
    """Its kernels, RoPE tables and backends belong to the device and dtypes it was built with."""
    for move in (lambda m: m.to("meta"), lambda m: m.half(), lambda m: m.float(), lambda m: m.cpu()):
        with pytest.raises(InputError, match="stays on the device and dtypes it was built with"):
            move(model)
    assert next(model.buffers()).device.type == "cpu"  # nothing was moved


def test_config_takes_integer_likes_and_refuses_the_rest():
    import numpy as np

    config = tiny_config("i2v", dim=np.int64(256), patch_size=[1, 2, 2], eps=np.float32(1e-6))
    assert type(config.dim) is int and config.patch_size == (1, 2, 2) and type(config.eps) is float
    for bad, message in [({"num_heads": 0}, "num_heads must be a positive integer"),
                         ({"dim": True}, "dim must be"), ({"patch_size": (1, 2)}, "patch_size must be"),
                         ({"eps": "x"}, "eps must be"), ({"eps": float("nan")}, "eps must be"),
                         ({"eps": 0}, "eps must be a number in \\(0, 1\\), got 0"), ({"eps": 1}, "eps must be"),
                         ({"dim": 258}, "head_dim 129 must be even for RoPE")]:
        with pytest.raises(ValueError, match=message):
            tiny_config("i2v", **bad)
    # The packed format's header: a field this version does not know is named.
    with pytest.raises(InputError, match=r"^unknown WanConfig fields: \['heads', 'variant'\]$"):
        dit8.WanConfig.from_dict({**config.to_dict(), "variant": "i2v", "heads": 2})


def test_sequences_past_the_attention_kernels_offsets_are_refused_by_the_model():
    from dit8.config import I2V_14B
    from dit8.kernels.attention import max_attention_tokens
    from dit8.model import check_attention_tokens

    cpu = torch.device("cpu")
    limit = max_attention_tokens("int8", "triton", I2V_14B.num_heads, I2V_14B.head_dim)
    check_attention_tokens(I2V_14B, limit, "x", backend="auto", attention="int8", device=cpu)
    with pytest.raises(InputError, match=f"x has {limit + 1:,} tokens; the model's self-attention \\(int8, "
                                         f"Triton kernels with 32-bit offsets\\) takes at most {limit:,}"):
        check_attention_tokens(I2V_14B, limit + 1, "x", backend="auto", attention="int8", device=cpu)
    # 16-bit attention: "auto" gives long sequences to torch SDPA; "triton" asked for by name does not.
    check_attention_tokens(I2V_14B, 10 * limit, "x", backend="auto", attention="bf16", device=cpu)
    with pytest.raises(InputError, match="self-attention \\(bf16.*use backend='auto' or 'torch'"):
        check_attention_tokens(I2V_14B, limit + 1, "x", backend="triton", attention="bf16", device=cpu)
    # Over two processes self-attention has half the heads (rows half as wide), cross-attention half the tokens.
    limit2 = max_attention_tokens("int8", "triton", I2V_14B.num_heads // 2, I2V_14B.head_dim)
    assert limit2 < 2 * limit
    check_attention_tokens(I2V_14B, limit2, "x", backend="triton", attention="int8", device=cpu, world=2)
    with pytest.raises(InputError, match=f"self-attention.*at most {limit2:,}"):
        check_attention_tokens(I2V_14B, limit2 + 1, "x", backend="triton", attention="int8", device=cpu, world=2)


@pytest.mark.parametrize("tokens", [None, -1, True, 1.5, "3"])
def test_a_token_count_that_is_no_count_is_refused(tokens):
    """check_tokens passed None, -1, True or 1.5 silently where the limit is torch SDPA's (none), and
    failed with a TypeError comparing them with a Triton kernel's limit."""
    from dit8.model import check_attention_tokens

    model = WanDiT(tiny_config())
    model.check_tokens(0, "x")  # no tokens is a count too
    message = f"^tokens must be a non-negative integer \\(a count of video tokens\\), got {re.escape(repr(tokens))}$"
    with pytest.raises(InputError, match=message):
        model.check_tokens(tokens, "x")
    for backend in ("auto", "triton"):
        with pytest.raises(InputError, match=message):
            check_attention_tokens(model.config, tokens, "x", backend=backend, attention="int8",
                                   device=torch.device("cpu"))


def test_a_forward_past_the_attention_kernels_offsets_is_refused_before_it_runs(monkeypatch):
    model = WanDiT(tiny_config(), backend="triton", attention="int8")
    monkeypatch.setattr(model.patch_embedding, "forward", lambda *a: pytest.fail("the forward ran"))
    from dit8.kernels.attention import max_attention_tokens

    limit = max_attention_tokens("int8", "triton", 2, 128)
    # Unallocated latents of 9 x 1024 x 1024 patches, more tokens than that: only their shapes are read.
    x, y = (torch.empty(1, c, 9, 2048, 2048, device="meta") for c in (16, 20))
    assert 9 * 1024 * 1024 > limit
    with pytest.raises(InputError, match=f"x \\(patch grid \\(9, 1024, 1024\\)\\) has 9,437,184 tokens; "
                                         f"the model's self-attention \\(int8.* at most {limit:,}"):
        model(x, torch.zeros(1), torch.zeros(1, 4, 64), torch.zeros(1, 257, 32), y=y)
