"""WanDiT: the Wan2.1 diffusion transformer (spec/wan21-dit.md). Every linear, norm, RoPE, attention
and activation is an op of dit8.kernels; patchify, the time sinusoid and the modulation sums are torch.

Module and tensor names follow the official checkpoint, so `model.state_dict()` keys are the official
keys. Numerics follow the official code: the residual stream, modulation, time embedding, time
projection, head and all norm statistics are fp32; the block linears and attention run in the model's
compute dtype, or W8A8 where the checkpoint's block linears are 8-bit.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import dit8.kernels as ops
from dit8.kernels.attention import PRECISIONS, check_attention_runs, max_attention_tokens
from dit8.kernels.checks import FLOAT_DTYPES
from dit8.kernels.registry import (BackendError, backend_runs_on, check_preferred_backend, reference_only_notice,
                                   unavailable_reason)

from .config import WanConfig
from .devices import check_not_meta
from .errors import InputError, releases_frames
from .layers import Activation, LayerNorm, Linear, ModulatedLayerNorm, QuantizedRows, RMSNorm, Setup, empty_buffer
from .parallel import SequenceParallel, bits_fingerprint, checksums, fingerprint
from .rope import MAX_POSITIONS, rope_table


class PatchEmbedding(nn.Module):
    """The Conv3d patch embedding (kernel = stride = patch) applied as a linear map of flattened patches."""

    weight: torch.Tensor  # buffers: declared, as register_buffer hides their types from type checkers
    bias: torch.Tensor

    def __init__(self, config: WanConfig, setup: Setup):
        super().__init__()
        self.setup = setup
        self.register_buffer("weight", empty_buffer(setup, config.dim, config.in_dim, *config.patch_size))
        self.register_buffer("bias", empty_buffer(setup, config.dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return ops.linear(patches, self.weight.flatten(1), self.bias, backend=self.setup.backend_of("linear"))


# RoPE tables are kept for the last few patch grids used: a service generating at many sizes would
# otherwise keep one table per size for good (16 MiB each at 480P, 81 frames).
POSITION_TABLES_KEPT = 4
# Guards every model's table of them: one model may run forwards in several threads at once (two
# pipelines over the same loaded models, say), and two evicting the same oldest grid raised KeyError,
# or "dictionary changed size during iteration". (Module-wide: a lock attribute would not deep-copy.)
_POSITIONS_LOCK = threading.Lock()


@dataclass
class CrossKV:
    """One block's cross-attention keys and values; they depend only on the context."""

    k: torch.Tensor
    v: torch.Tensor
    k_img: torch.Tensor | None = None
    v_img: torch.Tensor | None = None


@dataclass
class TokenPositions:
    """What self-attention needs to know of the tokens: the RoPE cos/sin [L, head_dim/2] of the tokens
    this process holds, and how many tokens the whole sequence has (under sequence parallelism the
    sequence is padded to a multiple of the process count, and the padding must not serve as keys)."""

    cos: torch.Tensor
    sin: torch.Tensor
    tokens: int


# The inputs whose values the processes of a sequence-parallel group compare: x, y, context, clip_fea.
_SUMMED_INPUTS = 4


@dataclass
class EncodedContext:
    """The text (and image) conditioning projected to every block's keys and values, computed once per
    generation by `WanDiT.encode_context` and reused by every sampling step. `model` refers (weakly) to
    the model that made it: another model's keys and values, even of the same shapes, are refused. A
    pickled or saved one loses that reference and is taken by any model of its shapes."""

    batch: int
    blocks: list[CrossKV]
    model: Callable[[], WanDiT | None] | None = field(default=None, repr=False, compare=False)
    # Under sequence parallelism, `checksums` of the context and image features it was encoded from,
    # for the processes to check that they were given the same.
    checksum: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # A weak reference does not pickle (torch.save, a multiprocessing queue): a saved context is
        # loaded without it, and is then taken by any model of its shapes, as one built by hand is.
        return {**self.__dict__, "model": None}


class SelfAttention(nn.Module):
    def __init__(self, config: WanConfig, setup: Setup, precision: str, prefix: str):
        super().__init__()
        C = config.dim
        self.heads, self.precision, self.setup = config.num_heads, precision, setup
        self.q, self.k, self.v, self.o = (setup.linear(f"{prefix}.{n}", C, C) for n in "qkvo")
        self.norm_q, self.norm_k = RMSNorm(C, config.eps, setup), RMSNorm(C, config.eps, setup)

    def forward(self, x: torch.Tensor | QuantizedRows, positions: TokenPositions, residual: torch.Tensor,
                gate: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream after `residual + o(attention) · gate` (fused into o's epilogue
        where o is 8-bit)."""
        # RMSNorm spans all heads together (full width), then heads are split and rotated; one kernel.
        q, k = ops.qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, positions.cos,
                                positions.sin, heads=self.heads, eps=self.norm_q.eps, out_dtype=self.setup.dtype,
                                backend=self.setup.backend_of("qk_norm_rope"))
        v = self.v(x).unflatten(-1, (self.heads, -1))
        parallel = self.setup.parallel
        if parallel is not None:
            # This process's tokens, all heads -> every token, its group of heads; without the padding,
            # which must neither serve as keys nor join the 8-bit paths' per-block statistics.
            q, k, v = (parallel.tokens_to_heads(t)[:, :positions.tokens] for t in (q, k, v))
        out = ops.attention(q, k, v, precision=self.precision, backend=self.setup.backend_of("attention"))
        if parallel is not None:
            padding = parallel.world * parallel.local_length(positions.tokens) - positions.tokens
            out = parallel.heads_to_tokens(F.pad(out, (0, 0, 0, 0, 0, padding)) if padding else out)
        return self.o(out.flatten(2), residual, gate)


class CrossAttention(nn.Module):
    def __init__(self, config: WanConfig, setup: Setup, prefix: str):
        super().__init__()
        C = config.dim
        self.heads, self.setup = config.num_heads, setup
        self.q, self.k, self.v, self.o = (setup.linear(f"{prefix}.{n}", C, C) for n in "qkvo")
        self.norm_q, self.norm_k = RMSNorm(C, config.eps, setup), RMSNorm(C, config.eps, setup)
        if config.is_i2v:
            self.k_img = setup.linear(f"{prefix}.k_img", C, C)
            self.v_img = setup.linear(f"{prefix}.v_img", C, C)
            self.norm_k_img = RMSNorm(C, config.eps, setup)

    def project_context(self, text: torch.Tensor, image: torch.Tensor | None) -> CrossKV:
        dtype = self.setup.dtype
        kv = CrossKV(self.norm_k(self.k(text), dtype).unflatten(-1, (self.heads, -1)),
                     self.v(text).unflatten(-1, (self.heads, -1)))
        if image is not None:
            kv.k_img = self.norm_k_img(self.k_img(image), dtype).unflatten(-1, (self.heads, -1))
            kv.v_img = self.v_img(image).unflatten(-1, (self.heads, -1))
        return kv

    def forward(self, x: torch.Tensor | QuantizedRows, kv: CrossKV, residual: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream after `residual + o(attention)` (no gate in cross-attention)."""
        q = self.norm_q(self.q(x), self.setup.dtype).unflatten(-1, (self.heads, -1))
        out = ops.cross_attention(q, kv.k, kv.v, kv.k_img, kv.v_img, backend=self.setup.backend_of("cross_attention"))
        return self.o(out.flatten(2), residual)


class WanBlock(nn.Module):
    modulation: torch.Tensor

    def __init__(self, config: WanConfig, setup: Setup, attention: str, index: int):
        super().__init__()
        C, F = config.dim, config.ffn_dim
        b = f"blocks.{index}."
        # Where the linears a norm feeds are 8-bit, the norm kernel quantizes its output once for them.
        self.norm1 = ModulatedLayerNorm(config.eps, setup, quantize_to=setup.input_quantization(
            b + "self_attn.q", b + "self_attn.k", b + "self_attn.v"))
        self.norm2 = ModulatedLayerNorm(config.eps, setup, quantize_to=setup.input_quantization(b + "ffn.0"))
        self.register_buffer("modulation", empty_buffer(setup, 1, 6, C, dtype=torch.float32))
        self.self_attn = SelfAttention(config, setup, attention, b + "self_attn")
        self.norm3 = LayerNorm(C, config.eps, setup, quantize_to=setup.input_quantization(b + "cross_attn.q"))
        self.cross_attn = CrossAttention(config, setup, b + "cross_attn")
        self.ffn = FeedForward(setup.linear(b + "ffn.0", C, F), setup.linear(b + "ffn.2", F, C), setup,
                               quantize_to=setup.input_quantization(b + "ffn.2"))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, positions: TokenPositions, kv: CrossKV) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation + e0).unbind(1)
        # x = x + SelfAttn(norm1(x)·(1 + scale) + shift) · gate, the add done by the o projection
        x = self.self_attn(self.norm1(x, shift_msa, scale_msa), positions, residual=x, gate=gate_msa)
        # x = x + CrossAttn(norm3(x), context)
        x = self.cross_attn(self.norm3(x), kv, residual=x)
        # x = x + FFN(norm2(x)·(1 + scale) + shift) · gate
        return self.ffn(self.norm2(x, shift_mlp, scale_mlp), residual=x, gate=gate_mlp)


class FeedForward(nn.Sequential):
    """ffn.0 -> GELU(tanh) -> ffn.2 (indices as in the checkpoint). Where ffn.2 is 8-bit, the GELU kernel
    also quantizes its output for it."""

    def __init__(self, up: nn.Module, down: nn.Module, setup: Setup, quantize_to: torch.dtype | None = None):
        super().__init__(up, Activation("gelu_tanh", setup), down)
        self.quantize_to, self.quant_backend = quantize_to, setup.backend_of("gelu_tanh_quant")

    def forward(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        up, act, down = self
        h = up(x)
        if self.quantize_to is None:
            h = act(h)
        else:
            h = QuantizedRows(*ops.gelu_tanh_quant(h.reshape(-1, h.shape[-1]), self.quantize_to,
                                                   backend=self.quant_backend), tuple(h.shape[:-1]))
        return down(h, residual, gate)


class Head(nn.Module):
    """Final adaLN (shift, scale from `e`, not e0) and projection to patch pixels, in fp32."""

    modulation: torch.Tensor

    def __init__(self, config: WanConfig, setup: Setup):
        super().__init__()
        self.norm = ModulatedLayerNorm(config.eps, setup, out_dtype=torch.float32)
        self.register_buffer("modulation", empty_buffer(setup, 1, 2, config.dim, dtype=torch.float32))
        out = config.out_dim * math.prod(config.patch_size)
        self.head = Linear(config.dim, out, setup, dtype=torch.float32)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + e[:, None, :]).unbind(1)
        return self.head(self.norm(x, shift, scale))


class ImageEmbedding(nn.Module):
    """CLIP features [B, N, clip_dim] -> image tokens [B, N, dim]; keys `img_emb.proj.{0,1,3,4}`."""

    def __init__(self, config: WanConfig, setup: Setup):
        super().__init__()
        E, C = config.clip_dim, config.dim
        self.proj = nn.Sequential(LayerNorm(E, 1e-5, setup), Linear(E, E, setup), Activation("gelu", setup),
                                  Linear(E, C, setup), LayerNorm(C, 1e-5, setup))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


def sinusoidal_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """[cos(t·f_j), sin(t·f_j)] with f_j = 10000^(−j/(width/2)), built in float64, returned fp32."""
    half = width // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class WanDiT(nn.Module):
    """The Wan2.1 DiT. Build it with `dit8.load_dit`; its tensors are allocated here, uninitialised.

    dtype: compute dtype of the matmuls and attention (bf16 or fp32; fp16 works too). The embeddings of
    time, the modulation tables, norms and the head are always fp32.
    backend: "auto" (the kernels verified on this GPU generation, else the torch reference), "torch",
        or "triton"/"cuda": every op that has that kernel runs it, the others as "auto" does.
    attention: "bf16" (unquantized, in the compute dtype), or "int8"/"fp8" where a kernel backend has them.
    quantized: block linear layers (e.g. "blocks.0.ffn.0") holding fp8/int8 weights, run as W8A8.
    parallel: split every forward over the processes of a torch.distributed group (runtime/parallel.py),
        each computing 1/P of the tokens; every process calls forward with the same inputs and gets the
        whole result.
    """

    def __init__(self, config: WanConfig, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, backend: str = "auto", attention: str = "bf16",
                 quantized: Mapping[str, torch.dtype] | None = None, parallel: SequenceParallel | None = None):
        super().__init__()
        if dtype not in FLOAT_DTYPES:  # 8-bit weights are per layer (`quantized`), not a compute dtype
            raise InputError(f"dtype (the compute dtype) must be one of "
                             f"{tuple(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)}, got {dtype!r}")
        if parallel is not None:
            if not isinstance(parallel, SequenceParallel):
                raise InputError(f"parallel must be a dit8.SequenceParallel, got {type(parallel).__name__}")
            parallel.check_heads(config.num_heads)
        setup = Setup(torch.device(device), dtype, backend, dict(quantized or {}), parallel)
        _check_backend(setup)
        _check_attention(attention, setup)
        notice = reference_only_notice(backend, setup.device)
        if notice is not None:
            warnings.warn(notice, stacklevel=2)
        C = config.dim
        self.config, self.setup = config, setup
        self.patch_embedding = PatchEmbedding(config, setup)
        self.text_embedding = nn.Sequential(Linear(config.text_dim, C, setup), Activation("gelu_tanh", setup),
                                            Linear(C, C, setup))
        f32 = torch.float32
        self.time_embedding = nn.Sequential(Linear(config.freq_dim, C, setup, f32), Activation("silu", setup),
                                            Linear(C, C, setup, f32))
        self.time_projection = nn.Sequential(Activation("silu", setup), Linear(C, 6 * C, setup, f32))
        self.blocks = nn.ModuleList(WanBlock(config, setup, attention, n) for n in range(config.num_layers))
        self.head = Head(config, setup)
        if config.is_i2v:
            self.img_emb = ImageEmbedding(config, setup)
        self._positions: dict[tuple[int, int, int], TokenPositions] = {}
        self._agreed = False  # under sequence parallelism: whether the processes checked they hold the same model

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half() and the like all come here. The model's kernels, RoPE tables and
        # per-op backends are chosen for the device and dtypes it was built with, so it does not move.
        raise InputError("a WanDiT stays on the device and dtypes it was built with: build or load it "
                         "where it runs, e.g. dit8.load_dit(path, device='cuda', dtype=torch.bfloat16)")

    # -- conditioning -------------------------------------------------------------------------------

    def encode_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> EncodedContext:
        """Project text context [B, Ltext, text_dim] (and CLIP features [B, N, clip_dim] for I2V) to
        every block's cross-attention keys and values. Reuse the result across sampling steps."""
        cfg = self.config
        _expect(context, "context", (None, None, cfg.text_dim))
        B, L, _ = context.shape
        if L > cfg.text_len:
            raise InputError(f"context has {L} rows; the model takes at most text_len = {cfg.text_len}")
        _check_finite(context, "context", self.setup.dtype)  # (padded in the compute dtype)
        check_not_meta(context, "context")
        # Zero rows pad the text to text_len; they become a constant vector and are attended to.
        padded = torch.zeros(B, cfg.text_len, cfg.text_dim, dtype=self.setup.dtype, device=self.setup.device)
        padded[:, :L] = context
        text = self.text_embedding(padded)
        image = None
        if cfg.is_i2v:
            if clip_fea is None:
                raise InputError("clip_fea is required by an I2V model")
            _expect(clip_fea, "clip_fea", (B, None, cfg.clip_dim))
            if clip_fea.shape[1] == 0:
                raise InputError("clip_fea has no tokens; expected the CLIP features of the image [B, N, clip_dim]")
            _check_finite(clip_fea, "clip_fea", torch.float32)
            check_not_meta(clip_fea, "clip_fea")
            # The image embedding's first norm takes the float dtypes of the kernels, not float64.
            image = self.img_emb(clip_fea.to(self.setup.device, torch.float32 if clip_fea.dtype == torch.float64
                                             else clip_fea.dtype))
        elif clip_fea is not None:
            raise InputError("clip_fea was given but this is a T2V model")
        checksum = None if self.setup.parallel is None else checksums(self.setup.device, context, clip_fea)
        return EncodedContext(B, [block.cross_attn.project_context(text, image) for block in self.blocks],
                              weakref.ref(self), checksum)

    def positions(self, grid: tuple[int, int, int]) -> TokenPositions:
        """RoPE cos/sin of the tokens of a patch grid this process computes (all of them, or its slice
        under sequence parallelism); kept for the POSITION_TABLES_KEPT grids used last."""
        if torch.compiler.is_compiling():
            # torch.compile cannot enter the lock (a graph break, an error under fullgraph=True): a compiled
            # forward builds the table in its graph, a few elementwise ops next to the blocks.
            return self._build_positions(grid)
        with _POSITIONS_LOCK:
            positions = self._positions.pop(grid, None)
        if positions is None:  # (built outside the lock: other grids' forwards need not wait for it)
            positions = self._build_positions(grid)
        with _POSITIONS_LOCK:
            self._positions[grid] = positions  # (the most recently used last)
            while len(self._positions) > POSITION_TABLES_KEPT:
                del self._positions[next(iter(self._positions))]
        return positions

    def _build_positions(self, grid: tuple[int, int, int]) -> TokenPositions:
        cos, sin = rope_table(grid, self.config.head_dim, device=self.setup.device)
        tokens = cos.shape[0]
        if self.setup.parallel is not None:
            cos, sin = self.setup.parallel.shard(cos, 0), self.setup.parallel.shard(sin, 0)
        return TokenPositions(cos, sin, tokens)

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """The patch grid (frames, rows, columns) of a latent x [B, C, T, H, W]."""
        pt, ph, pw = self.config.patch_size
        T, H, W = x.shape[-3:]
        return T // pt, H // ph, W // pw

    def check_tokens(self, tokens: int, what: str) -> None:
        """InputError unless this model's attention kernels take a forward over `tokens` video tokens
        (`check_attention_tokens`); `what` names the input in the message."""
        _check_token_count(tokens)
        self._check_token_limit(tokens, what)

    def _check_token_limit(self, tokens: int, what: str) -> None:
        # (The forward's own count, math.prod of its grid, needs no type check: under torch.compile with
        # dynamic shapes it is a SymInt.)
        attention = self.blocks[0].self_attn.precision if len(self.blocks) else "bf16"
        world = 1 if self.setup.parallel is None else self.setup.parallel.world
        _check_attention_tokens(self.config, tokens, what, self.setup, attention, world)  # (per-op backends cached)

    # -- forward ------------------------------------------------------------------------------------

    @releases_frames
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | EncodedContext,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity [B, out_dim, T, H, W] fp32 for latents x [B, out_dim, T, H, W] at timesteps t [B]
        (0..1000).

        `context` is the text encoder output [B, Ltext, text_dim] or an EncodedContext from this model's
        `encode_context` (which took clip_fea already). I2V models also take y [B, in_dim − out_dim, T,
        H, W]. A failed forward's exception holds none of its activations (`errors.releases_frames`).
        """
        cfg = self.config
        parallel = self.setup.parallel
        if parallel is None:
            x, t, context = self._prepare(x, t, context, clip_fea, y)
        else:
            x, t, context = self._prepare_together(parallel, x, t, context, clip_fea, y)
        tokens, grid = self._patchify(x)
        if parallel is not None:
            tokens = parallel.shard(tokens, 1)
        h = self.patch_embedding(tokens).float()
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        positions = self.positions(grid)
        for block, kv in zip(self.blocks, context.blocks, strict=True):
            h = block(h, e0, positions, kv)
        out = self.head(h, e)
        if parallel is not None:
            out = parallel.gather(out, 1, positions.tokens)
        return self._unpatchify(out, grid)

    if TYPE_CHECKING:  # nn.Module's __call__ returns Any: callers get forward's types
        __call__ = forward

    def _prepare(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | EncodedContext,
                 clip_fea: torch.Tensor | None, y: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, EncodedContext]:
        """The checked inputs on the model's device: x with y joined along the channels (fp32), t, and
        the encoded context."""
        x, y, t = self._check_inputs(x, t, y)
        if not isinstance(context, EncodedContext):
            _expect(context, "context", (None, None, self.config.text_dim))
            if context.shape[0] != x.shape[0]:  # (before clip_fea's batch is held to the context's)
                raise InputError(f"context has batch {context.shape[0]} but x has batch {x.shape[0]}")
            check_not_meta(context, "context")
            context = self.encode_context(context.to(self.setup.device), clip_fea)
        elif clip_fea is not None:
            raise InputError("clip_fea goes to encode_context; an EncodedContext already holds the image keys")
        self._check_encoded(context, x.shape[0])
        if y is not None:
            x = torch.cat([x, y], dim=1)
        return x, t, context

    def _prepare_together(self, parallel: SequenceParallel, *inputs
                          ) -> tuple[torch.Tensor, torch.Tensor, EncodedContext]:
        """`_prepare` in every process of the group, which then check together that they were given the
        same model and inputs: different shapes would mix parts of different forwards (or hang); other
        timesteps, latents, context or weights, the same. A process whose inputs are refused takes part in
        that check before it raises: leaving alone, it would leave the others waiting for it in the
        exchange (until the group's timeout)."""
        device = self.setup.device
        if not self._agreed:
            # Once per model: its description, then (the same shapes now certain) every tensor's bits.
            attention = self.blocks[0].self_attn.precision
            parallel.agree("models (configuration, weight formats, compute dtype, backend or attention)",
                           fingerprint(self.config, self.setup.dtype, self.setup.backend, attention,
                                       sorted((k, str(v)) for k, v in self.setup.quantized.items())), device)
            parallel.agree("model weights", bits_fingerprint(self.buffers()), device)
            self._agreed = True
        refused = None
        try:
            x, t, context = self._prepare(*inputs)
            out_dim = self.config.out_dim  # x holds y after its own channels
            values = torch.cat([checksums(device, x[:, :out_dim], x[:, out_dim:]),
                                checksums(device, None, None) if context.checksum is None else context.checksum])
            mine = fingerprint(tuple(x.shape), t)
        except InputError as err:
            refused, mine = err, fingerprint("refused", str(err))
            # As many sums as the inputs' (x, y, context, clip_fea), or the exchange would mismatch.
            values = checksums(device, *[None] * _SUMMED_INPUTS).fill_(math.nan)
        try:
            parallel.agree("inputs (latent shapes, timesteps, latents or context), or inputs refused", mine,
                           device, values)
        except InputError:
            if refused is None:
                raise
        if refused is not None:
            raise refused
        return x, t, context

    def _check_encoded(self, context: EncodedContext, batch: int) -> None:
        """An EncodedContext must come from a model of this one's shape: a block count or an image branch
        of another model would run silently wrong."""
        if context.batch != batch:
            raise InputError(f"context has batch {context.batch} but x has batch {batch}")
        if len(context.blocks) != len(self.blocks):
            raise InputError(f"the encoded context has {len(context.blocks)} blocks; this model has "
                             f"{len(self.blocks)}: encode it with this model's encode_context")
        if (context.blocks[0].k_img is not None) != self.config.is_i2v:
            raise InputError(f"the encoded context {'has' if context.blocks[0].k_img is not None else 'lacks'} "
                             f"image keys; this model is {self.config.variant}")
        if context.model is not None and context.model() is not self:
            # Same shapes, other weights (another file, scheme or LoRA): the output would be silently wrong.
            raise InputError("the encoded context was made by another model's encode_context: encode it with "
                             "this model's")

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x and y (fp32) and t, checked against the model and moved to its device."""
        cfg = self.config
        dev = self.setup.device
        x_channels = cfg.out_dim if cfg.is_i2v else cfg.in_dim
        _expect(x, "x", (None, x_channels, None, None, None))
        _check_finite(x, "x", torch.float32)
        B, _, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw or not T * H * W:
            raise InputError(f"x has frames/height/width {(T, H, W)}, not positive multiples of the patch "
                             f"{cfg.patch_size}")
        grid = self.patch_grid(x)
        if max(grid) > MAX_POSITIONS:
            raise InputError(f"x has a patch grid of {grid} (frames, rows, columns); the model's position encoding "
                             f"covers {MAX_POSITIONS} along each")
        self._check_token_limit(math.prod(grid), f"x (patch grid {grid})")
        if not isinstance(t, torch.Tensor) or t.shape != (B,):
            raise InputError(f"t must be a tensor of shape ({B},), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise InputError(f"t must be real timesteps (a float or integer tensor), got dtype {t.dtype}")
        # Values are checked where that costs no GPU synchronisation (nor breaks a CUDA-graph capture).
        if t.device.type == "cpu" and not ((t >= 0) & (t <= 1000)).all():  # (NaN fails both)
            raise InputError(f"t must be timesteps in [0, 1000], got {t.tolist()}")
        if cfg.is_i2v:
            if y is None:
                raise InputError("y (mask + image latent) is required by an I2V model")
            _expect(y, "y", (B, cfg.in_dim - x_channels, T, H, W))
            _check_finite(y, "y", torch.float32)
            check_not_meta(y, "y")
            y = y.to(dev, torch.float32)
        elif y is not None:
            raise InputError("y was given but this is a T2V model")
        # (Meta tensors are refused after the shapes, which they have: a test of the size limits may pass
        # one without allocating it.)
        check_not_meta(x, "x")
        check_not_meta(t, "t")
        return x.to(dev, torch.float32), y, t.to(dev)

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        # Conv3d with kernel = stride = patch is a linear map of each patch, channel slowest:
        # [B, C, F·pt, H·ph, W·pw] -> [B, F·H·W tokens, C·pt·ph·pw].
        pt, ph, pw = self.config.patch_size
        B, C = x.shape[:2]
        grid = self.patch_grid(x)
        x = x.reshape(B, C, grid[0], pt, grid[1], ph, grid[2], pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, math.prod(grid), C * pt * ph * pw)
        return x, grid

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # Head features are ordered (pt, ph, pw, c) with c fastest: the opposite of the patch input.
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        B, c = out.shape[0], self.config.out_dim
        out = out.reshape(B, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, c, f * pt, h * ph, w * pw)


def _check_backend(setup: Setup) -> None:
    """A model's backend is a preference (Setup.backend_of), but one that no op can follow here is a
    mistake to report, not to ignore; so is a DIT8_BACKEND that names none."""
    check_preferred_backend()
    if not backend_runs_on(setup.backend, setup.device):
        raise BackendError(f"backend {setup.backend!r}: no op can run its kernels on {setup.device.type} tensors "
                           f"here ({unavailable_reason(setup.backend, setup.device)})")


def check_backend_and_attention(backend: str, attention: str, device: torch.device) -> None:
    """The checks a WanDiT on `device` makes of its `backend` and `attention` when it is built, in the
    same order, without building one: a command makes them before a long checkpoint load, and a backend
    that cannot run here is named as such rather than as an attention path that lacks it."""
    setup = Setup(device, torch.float32, backend)
    _check_backend(setup)
    _check_attention(attention, setup)


def check_attention_tokens(config: WanConfig, tokens: int, what: str, *, backend: str, attention: str,
                           device: torch.device, world: int = 1) -> None:
    """InputError unless a WanDiT of `config` built on `device` with `backend` and `attention` (split over
    `world` processes) takes a forward over `tokens` video tokens: the Triton attention kernels bound them
    (`kernels.attention.max_attention_tokens`). `what` names the input. A video too long for them is so
    refused before the encoders run, or before a command loads the model."""
    _check_token_count(tokens)
    _check_attention_tokens(config, tokens, what, Setup(device, torch.float32, backend), attention, world)


def _check_token_count(tokens: object) -> None:
    """None, a bool, a float or a negative count passed the limit silently wherever the limit is None (torch
    SDPA), and True counted as 1; another type failed in the comparison with a TypeError."""
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
        raise InputError(f"tokens must be a non-negative integer (a count of video tokens), got {tokens!r}")


def _check_attention_tokens(config: WanConfig, tokens: int, what: str, setup: Setup, attention: str,
                            world: int) -> None:
    # Under sequence parallelism self-attention sees every token of heads/world heads, cross-attention
    # 1/world of the tokens with all heads.
    self_limit = max_attention_tokens(attention, setup.backend_of("attention"), config.num_heads // world,
                                      config.head_dim)
    cross_rows = max_attention_tokens("bf16", setup.backend_of("cross_attention"), config.num_heads, config.head_dim)
    cross_limit = None if cross_rows is None else cross_rows * world
    for op, precision, limit in (("self-attention", attention, self_limit), ("cross-attention", "bf16", cross_limit)):
        if limit is not None and tokens > limit:
            hint = ("attention='bf16' (torch SDPA takes it)" if precision != "bf16" else
                    "backend='auto' or 'torch' (torch SDPA takes it)")
            raise InputError(f"{what} has {tokens:,} tokens; the model's {op} ({precision}, Triton kernels with "
                             f"32-bit offsets) takes at most {limit:,}: use {hint}, or a shorter or smaller video")


def _check_attention(attention: str, setup: Setup) -> None:
    """Refuse an unknown precision, or an 8-bit one no backend runs here, when the model is built
    rather than at its first forward."""
    if attention not in PRECISIONS:
        raise InputError(f"attention must be one of {PRECISIONS}, got {attention!r}")
    check_attention_runs(attention, setup.backend_of("attention"), setup.device)


def _expect(t: object, name: str, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
        want = tuple("*" if e is None else e for e in shape)
        raise InputError(f"{name} has shape {tuple(t.shape)}; expected {want}")


def _check_finite(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """NaN or Inf in an input would only come out as a velocity of NaN; so would a finite value past the
    range of `dtype`, which the model converts the input to (1e300 in a float64 x is Inf in fp32, 1e5 in
    a context Inf in an fp16 model). Checked on CPU tensors: on a GPU the check would wait for the device
    at every call (and cannot run inside a CUDA-graph capture)."""
    if t.device.type != "cpu":
        return
    if not torch.isfinite(t).all():
        raise InputError(f"{name} contains {'NaN' if torch.isnan(t).any() else 'Inf'} values")
    if torch.finfo(dtype).max < torch.finfo(t.dtype).max and not torch.isfinite(t.to(dtype)).all():
        raise InputError(f"{name} has values past the range of {str(dtype).removeprefix('torch.')}, which the "
                         f"model computes it in (magnitudes above {torch.finfo(dtype).max:.4g})")
