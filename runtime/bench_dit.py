"""`dit8 bench dit`: time WanDiT on random weights of the real I2V-14B shapes, built on the device.

No checkpoint is read and the model never exists on the CPU (runtime/random_dit.py). `run_bench` times,
with CUDA events after a warm-up, the context encoding (cross-attention k/v, once per generation), one
forward and the 4-step distilled loop, splits one profiled forward into parts (runtime/profiling.py
says which kernels count as what; `idle` is the forward time the kernels do not cover: launch gaps,
host work, synchronisation) and reads the peak memory; with `compare="diffusers"` it also times
diffusers' WanTransformer3DModel (SDPA, in the compute dtype) on the same weights.

FLOP budget (`forward_flops`): GEMMs 2·L·(6·C² + 2·C·F) per block (self-attention q/k/v/o, cross q/o,
FFN; the cross k/v belong to the context encoding), attention 4·L·C·(L + text + image keys) per
block; at 480P, 81 frames that is ~784 and ~900 TFLOP over 40 blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dit8.kernels import candidates

from .conditioning import check_frames, check_grid, check_size
from .choices import PRECISIONS
from .config import I2V_14B, WanConfig, tiny_config
from .cuda_graph import CapturedForward
from .devices import available_host_memory, peak_memory, reset_peak, resolve_device, synchronize
from .diffusers_reference import diffusers_inputs, diffusers_skip_reason, to_diffusers
from .errors import InputError
from .layouts import block_linears, expected_shapes
from .model import EncodedContext, WanDiT, check_backend_and_attention
from .packed_format import SCHEMES
from .parallel import join_launched_group
from .profiling import profile_parts, time_ms
from .progress import format_bytes
from .random_dit import build_model, random_conditioning
from .sampler import DistilledSampler, evenly_spaced_steps

CONFIGS = {"i2v-14b": I2V_14B, "tiny": tiny_config("i2v")}


@dataclass(frozen=True)
class BenchSettings:
    """What to benchmark. scheme "bf16" keeps float block linears in the compute dtype (bf16 on CUDA,
    fp32 on CPU); "fp8"/"int8" quantize them. size is (width, height) in pixels. backend: the model's
    (registry.model_backend: "triton"/"cuda" where an op has that kernel, "auto" for the others).
    steps = 0 skips the loop; compare = "diffusers" adds diffusers' forward; cuda_graph also times the
    forward replayed from a CUDA graph (`dit8.CapturedForward`). sequence_parallel: split the model over
    the processes of a launcher (runtime/parallel.py), each of which runs the benchmark alike."""

    scheme: str = "bf16"
    attention: str = "bf16"
    frames: int = 81
    size: tuple[int, int] = (832, 480)
    layers: int | None = None  # None: the config's (40 for I2V-14B)
    steps: int = 4
    backend: str = "auto"
    device: str = "cuda"
    config: str | None = None  # "i2v-14b" or "tiny"; None: i2v-14b on CUDA, tiny on CPU
    compare: str | None = None
    repeat: int = 3
    warmup: int = 1
    profile: bool = True
    cuda_graph: bool = False
    seed: int = 0
    sequence_parallel: bool = False

    def config_name(self) -> str:
        """The dimensions benchmarked: `config`, else i2v-14b on CUDA and tiny elsewhere."""
        return self.config or ("i2v-14b" if torch.device(self.device).type == "cuda" else "tiny")

    def model_config(self) -> WanConfig:
        """The WanConfig of `config_name()` with `layers` blocks (all when None)."""
        name = self.config_name()
        if name not in CONFIGS:
            raise InputError(f"config must be one of {tuple(CONFIGS)}, got {name!r}")
        base = CONFIGS[name]
        return dataclasses.replace(base, num_layers=self.layers or base.num_layers)


def check_bench_settings(s: BenchSettings) -> None:
    """Raise InputError for settings that cannot run here, before anything is allocated."""
    if s.scheme not in SCHEMES:
        raise InputError(f"scheme must be one of {SCHEMES}, got {s.scheme!r}")
    if s.attention not in PRECISIONS:
        raise InputError(f"attention must be one of {PRECISIONS}, got {s.attention!r}")
    # Before model_config(), whose own check of a negative count named num_layers, not the setting.
    if s.layers is not None and s.layers < 1:
        raise InputError(f"layers must be at least 1, got {s.layers}")
    check_frames(s.frames)
    width, height = check_size(tuple(s.size))
    check_grid(s.frames, height, width, patch=s.model_config().patch_size)
    for name, value, least in (("steps", s.steps, 0), ("repeat", s.repeat, 1), ("warmup", s.warmup, 0)):
        if value < least:
            raise InputError(f"{name} must be at least {least}, got {value}")
    if s.steps > 1000:  # (the loop's steps are distinct timesteps of the 1000-step grid)
        raise InputError(f"steps must be at most 1000, got {s.steps}")
    if s.compare not in (None, "diffusers"):
        raise InputError(f"compare must be 'diffusers', got {s.compare!r}")
    device = resolve_device(s.device)
    if s.cuda_graph and device.type != "cuda":
        raise InputError("--cuda-graph needs --device cuda")
    if s.sequence_parallel and (s.cuda_graph or s.compare):
        raise InputError("--sequence-parallel runs neither --cuda-graph nor --compare (one process each)")
    check_backend_and_attention(s.backend, s.attention, device)
    if device.type == "cuda":
        check_weights_fit(s.model_config(), s.scheme, torch.cuda.mem_get_info(device)[0])
    elif (available := available_host_memory()) is not None:
        check_weights_fit(s.model_config(), s.scheme, available, where="this machine")


def weight_bytes(config: WanConfig, scheme: str) -> int:
    """A floor of the model's weight memory: 8-bit block linears (fp8, int8) at a byte an element and an
    fp32 scale a row, everything else in bf16."""
    # The blocks are alike: one is counted and multiplied, so the count does not cost time or memory per
    # block (listing the shapes of --layers 10**14 blocks never ended, where the check should refuse them).
    one_block = dataclasses.replace(config, num_layers=1)
    quantized = {f"blocks.0.{name}.weight" for name in block_linears(one_block)} if scheme != "bf16" else set()
    outside = block = 0
    for key, shape in expected_shapes(one_block).items():
        elements = math.prod(shape)
        size = elements + 4 * shape[0] if key in quantized else 2 * elements
        if key.startswith("blocks."):
            block += size
        else:
            outside += size
    return outside + config.num_layers * block


def check_weights_fit(config: WanConfig, scheme: str, free_bytes: int, where: str = "the GPU") -> None:
    """InputError before building a model whose weights alone exceed the free memory of `where` (building
    it would end in an out-of-memory error minutes later, or on a CPU in the kernel's OOM killer)."""
    need = weight_bytes(config, scheme)
    if need > free_bytes:
        raise InputError(f"the {scheme} weights of this {config.num_layers}-block model take at least "
                         f"{format_bytes(need)} and {where} has {format_bytes(free_bytes)} free: use --scheme fp8 "
                         f"or int8, or fewer --layers")


# -- FLOPs -----------------------------------------------------------------------------------------------


def forward_flops(config: WanConfig, tokens: int, text_tokens: int, image_tokens: int) -> dict[str, float]:
    """FLOPs of one forward's block GEMMs and attention (module docstring)."""
    C, F, n = config.dim, config.ffn_dim, config.num_layers
    return {"gemm": 2.0 * tokens * (6 * C * C + 2 * C * F) * n,
            "attention": 4.0 * tokens * C * (tokens + text_tokens + image_tokens) * n}


# -- the benchmark ----------------------------------------------------------------------------------------


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None,
              measured: Callable[[dict], None] | None = None) -> dict:
    """Build, warm up, time and profile; returns every number as a JSON-ready dict (see format_table).

    log(line): progress messages (e.g. print to stderr), each phase as it starts.
    measured(result): called with the numbers so far after each phase from the timed forwards on (e.g.
    to save them, so that a run stopped part way still leaves what it measured)."""
    check_bench_settings(settings)
    candidates.chosen()  # a DIT8_GLUON the ops would refuse fails here, before the model is built
    say = log or (lambda line: None)
    keep = measured or (lambda result: None)
    with torch.no_grad():
        bench = DitBench(settings, log=say)
        result = bench.describe()
        result.update(bench.time_forward())
        keep(result)
        if settings.cuda_graph:
            result["cuda_graph"] = bench.time_graph()
            keep(result)
        if settings.steps:
            result.update(bench.time_loop())
            keep(result)
        if settings.profile:
            result.update(bench.profile(result["forward_ms"]))
            keep(result)
        if settings.compare == "diffusers":
            result["diffusers"] = _compare_diffusers(bench, result)
    return result


def _compare_diffusers(bench: DitBench, result: dict) -> dict:
    reason = diffusers_skip_reason()
    if reason is not None:
        return {"skipped": reason}
    d = bench.time_diffusers(bench.swap_to_diffusers())
    d["ratio"] = d["forward_ms"] / result["forward_ms"]
    d["ratio_with_context"] = d["forward_ms"] / (result["forward_ms"] + result["context_ms"])
    return d


class DitBench:
    """One model of `settings` with its inputs, built on the device, and the measurements run_bench
    makes with it. Call under torch.no_grad()."""

    def __init__(self, settings: BenchSettings, *, log: Callable[[str], None] | None = None):
        self.settings, self.say = settings, log or (lambda line: None)
        device = torch.device(settings.device)
        self.parallel = None
        if settings.sequence_parallel:
            self.parallel, device = join_launched_group(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.config = device, settings.model_config()
        weights = "float" if settings.scheme == "bf16" else settings.scheme
        self.say(f"building a {self.config.num_layers}-block model ({weights} weights) on {device}")
        reset_peak(device)
        t0 = time.perf_counter()
        self.model: WanDiT | None = build_model(self.config, scheme=settings.scheme, device=device,
                                                backend=settings.backend,
                                                attention=settings.attention, seed=settings.seed,
                                                parallel=self.parallel)
        synchronize(device)
        self.init_s = time.perf_counter() - t0
        self.cond = random_conditioning(self.config, settings.frames, tuple(settings.size), device=device,
                                        seed=settings.seed + 1)
        self.encoded: EncodedContext | None = None
        self.output: torch.Tensor | None = None

    def encode(self) -> EncodedContext:
        """The context encoding (cross-attention keys and values) of the inputs."""
        return self.model.encode_context(self.cond.context, self.cond.clip_fea)

    def forward(self) -> torch.Tensor:
        """One forward with the context encoded once (by the first call); its output is kept (for the
        comparison with diffusers) until the next call."""
        if self.encoded is None:
            self.encoded = self.encode()
        self.output = None
        self.output = self.model(self.cond.x, self.cond.t, self.encoded, y=self.cond.y)
        return self.output

    def flops(self) -> dict[str, float]:
        """`forward_flops` of one forward on the inputs."""
        cond = self.cond
        return forward_flops(self.config, math.prod(cond.grid), cond.context.shape[1], cond.clip_fea.shape[1])

    def describe(self) -> dict:
        """Settings, device, dimensions, weight bytes and build time, FLOPs per forward."""
        s, cond, model = self.settings, self.cond, self.model
        return {
            "settings": {**dataclasses.asdict(s), "size": list(s.size), "device": str(self.device)},
            "device_name": _device_name(self.device), "torch": torch.__version__,
            "config": self.config.to_dict(), "compute_dtype": str(model.setup.dtype).removeprefix("torch."),
            "tokens": math.prod(cond.grid), "grid": list(cond.grid), "latent": list(cond.x.shape[1:]),
            "text": list(cond.context.shape[1:]), "clip": list(cond.clip_fea.shape[1:]),
            "weight_bytes": sum(b.nbytes for b in model.buffers()), "init_s": round(self.init_s, 3),
            "flops": self.flops(), "processes": 1 if self.parallel is None else self.parallel.world,
            # The Gluon kernels routed into the ops (kernels/candidates.py: DIT8_GLUON or those adopted
            # for this GPU), if any.
            "gluon": candidates.chosen(self.device),
        }

    def time_forward(self) -> dict:
        """Warm-up forwards, then the context encoding once and `repeat` forwards, timed; the peak
        memory of the forwards (model, encoded context and activations)."""
        self.say("warm-up")
        if self.encoded is None:
            self.encoded = self.encode()
        for _ in range(self.settings.warmup):
            self.forward()
        synchronize(self.device)
        self.say(f"timing {self.settings.repeat} forward(s)")
        context_ms = time_ms(self.encode, self.device)
        reset_peak(self.device)
        forward_ms = time_ms(self.forward, self.device, self.settings.repeat)
        peak, source = peak_memory(self.device)
        return {"context_ms": statistics.median(context_ms), "forward_ms": statistics.median(forward_ms),
                "forward_samples_ms": forward_ms, "peak_memory": {"source": source, "forward": peak}}

    def time_graph(self) -> dict:
        """The forward captured as a CUDA graph: capture time, replay time (median of `repeat`) and
        the replayed output's difference from the eager one."""
        self.say("capturing the forward as a CUDA graph")
        eager = self.output if self.output is not None else self.forward()  # time_forward's last output
        t0 = time.perf_counter()
        captured = CapturedForward(self.model, self.cond.x, self.cond.t, self.encoded, self.cond.y, warmup=1)
        synchronize(self.device)
        capture_s = time.perf_counter() - t0
        out = captured(self.cond.x, self.cond.t)
        replay = functools.partial(captured, self.cond.x, self.cond.t)
        replay_ms = statistics.median(time_ms(replay, self.device, self.settings.repeat))
        result = {"capture_s": round(capture_s, 3), "forward_ms": replay_ms, "rel_diff": _rel_diff(out, eager)}
        del captured, replay, out, eager
        gc.collect()
        return result

    def time_loop(self) -> dict:
        """A generation's DiT work: the context encoding, then the distilled sampler's steps."""
        n = self.settings.steps
        sampler = DistilledSampler(steps=evenly_spaced_steps(n))
        self.say(f"timing the {n}-step loop")

        def loop() -> torch.Tensor:
            context = self.encode()  # once per generation
            return sampler.sample(functools.partial(self.model, context=context, y=self.cond.y), self.cond.x)

        reset_peak(self.device)
        total = statistics.median(time_ms(loop, self.device))
        return {"loop": {"steps": list(sampler.steps), "total_ms": total, "per_step_ms": total / n,
                         "peak_memory": peak_memory(self.device)[0]}}

    def profile(self, forward_ms: float) -> dict:
        """Per-part time of one profiled forward; idle = forward_ms (a timed forward's) − kernel time."""
        self.say("profiling one forward")
        prof = profile_parts(self.forward, self.device)
        out: dict = {"parts_ms": {**prof.parts, "idle": max(0.0, forward_ms - prof.total)}, "top_kernels": prof.top}
        if not prof.top:
            out["profile_note"] = ("the profiler recorded no GPU kernels (is CUPTI usable here?)"
                                   if self.device.type == "cuda" else "the profiler recorded no ops")
        if self.device.type == "cuda":
            flops = self.flops()
            out["tflops"] = {part: flops[part] / prof.parts[part] / 1e9
                             for part in ("gemm", "attention") if prof.parts[part] > 0}
        return out

    def release(self) -> None:
        """Free the model and its encoded context (the inputs and the last output stay)."""
        self.model = self.encoded = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def swap_to_diffusers(self) -> torch.nn.Module:
        """diffusers' model on this model's weights (`to_diffusers`); frees dit8's model once they are
        copied, so the two never hold activations at once. Raises ImportError without diffusers."""
        self.say("building diffusers' WanTransformer3DModel on the same weights")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # dit8's cached activation blocks: room for a second model
        ref = to_diffusers(self.model)
        self.release()
        return ref

    def time_diffusers(self, ref: torch.nn.Module) -> dict:
        """Warm-up and `repeat` timed forwards of diffusers' model on the same inputs; its peak memory and
        its output's relative difference from dit8's last forward (when there was one)."""
        inputs = diffusers_inputs(ref, self.cond)
        last: list[torch.Tensor] = []

        def forward() -> torch.Tensor:
            last[:] = [ref(**inputs)[0]]
            return last[0]

        for _ in range(self.settings.warmup):
            forward()
        self.say(f"timing {self.settings.repeat} diffusers forward(s)")
        reset_peak(self.device)
        times = time_ms(forward, self.device, self.settings.repeat)
        peak = peak_memory(self.device)[0]
        out = {"dtype": str(ref.proj_out.weight.dtype).removeprefix("torch."), "attention": "SDPA",
               "forward_ms": statistics.median(times), "forward_samples_ms": times, "peak_memory": peak}
        if self.output is not None:
            out["rel_diff"] = _rel_diff(self.output, last[0].float())
        return out


# -- the table ---------------------------------------------------------------------------------------------


def format_table(r: dict) -> list[str]:
    """The short human summary of a run_bench result."""
    s, c = r["settings"], r["config"]
    name = "i2v-14b" if c["dim"] == I2V_14B.dim else "tiny"
    layers = f"{c['num_layers']} layer{'s' if c['num_layers'] != 1 else ''}"
    weights = f"{s['scheme']} weights" if s["scheme"] != "bf16" else f"float weights ({r['compute_dtype']})"
    lines = [
        f"model       {name} ({layers}), {weights}, {s['attention']} attention, "
        f"compute {r['compute_dtype']}, backend {s['backend']}, {r['device_name']}",
        f"input       {s['frames']} frames {s['size'][0]}x{s['size'][1]} -> latent {_dims(r['latent'])}, "
        f"grid {_dims(r['grid'])} = {r['tokens']:,} tokens; text {_dims(r['text'])}, clip {_dims(r['clip'])}",
        f"weights     {format_bytes(r['weight_bytes'])} on the device, built in {r['init_s']:.1f} s",
        f"forward     {r['forward_ms']:,.1f} ms (median of {len(r['forward_samples_ms'])}), "
        f"context k/v {r['context_ms']:,.1f} ms (once per generation)",
    ]
    if r.get("gluon"):
        lines.insert(1, "gluon       Gluon kernels routed in (kernels/candidates.py): "
                        + ", ".join(f"{name}={config}" for name, config in r["gluon"].items()))
    if r.get("processes", 1) > 1:
        lines.insert(1, f"parallel    {r['processes']} processes, each computing 1/{r['processes']} of the tokens; "
                        "times, memory and profile are the first process's")
    if "cuda_graph" in r:
        g = r["cuda_graph"]
        lines.append(f"cuda graph  forward {g['forward_ms']:,.1f} ms replayed (captured in {g['capture_s']:.1f} s), "
                     f"output rel diff from eager {g['rel_diff']:.1e}")
    if "loop" in r:
        loop = r["loop"]
        lines.append(f"loop        {len(loop['steps'])} steps {loop['total_ms']:,.1f} ms "
                     f"({loop['per_step_ms']:,.1f} ms/step, context k/v included)")
    if "parts_ms" in r:
        # Shares of the profiled forward: kernels plus idle (on a CPU the profiler's overhead can make
        # the op times add up to more than the timed forward).
        whole = sum(r["parts_ms"].values()) or 1.0
        lines.append("part             ms   share  rate")
        for part, ms in r["parts_ms"].items():
            rate = r.get("tflops", {}).get(part)
            lines.append(f"{part:<12}{ms:>9,.1f}  {100 * ms / whole:>5.1f}%"
                         + (f"  {rate:,.0f} TFLOP/s" if rate else ""))
    if "profile_note" in r:
        lines.append(f"note        {r['profile_note']}")
    peak = r["peak_memory"]
    loop_peak = f", loop {format_bytes(r['loop']['peak_memory'])}" if "loop" in r else ""
    lines.append(f"peak        forward {format_bytes(peak['forward'])}{loop_peak} ({peak['source']})")
    d = r.get("diffusers")
    if d is not None and "skipped" in d:
        lines.append(f"diffusers   skipped: {d['skipped']}")
    elif d is not None:
        lines.append(f"diffusers   forward {d['forward_ms']:,.1f} ms ({d['dtype']}, {d['attention']}), peak "
                     f"{format_bytes(d['peak_memory'])}; speed-up of dit8 {d['ratio']:.2f}x "
                     f"({d['ratio_with_context']:.2f}x counting its context k/v)"
                     + (f"; output rel diff {d['rel_diff']:.2e}" if "rel_diff" in d else ""))
    return lines


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))
