"""One DiT forward captured as a CUDA graph, replayed for every sampling step of a generation.

A forward of the 14B model launches about 40 x 20 kernels. At 480P each runs long enough that launch
gaps hardly show, but at smaller sizes, few layers or batch 1 on a fast GPU the CPU side of the forward
(Python, argument checks, launches) becomes the bottleneck; a replayed graph has none of it.

Within one generation everything but the latents x and the timesteps t is fixed: shapes, the encoded
context and the conditioning y. `CapturedForward` copies x and t into static input buffers, replays the
graph and returns a copy of its output buffer (a few MB, so samplers that keep earlier steps' outputs,
like UniPC, stay correct). The capture allocates from a private memory pool that the graph keeps for
its lifetime: drop the object when the generation is done.
"""

from __future__ import annotations

import numbers

import torch

from .errors import InputError
from .model import EncodedContext, WanDiT


class CapturedForward:
    """`model(x, t, context, y=y)` captured once for the shapes of x, t and y and this context; then
    `captured(x, t)` gives what `model(x, t, context, y=y)` would. warmup: eager forwards run first
    (Triton compilation, RoPE table, allocator), at least one."""

    def __init__(self, model: WanDiT, x: torch.Tensor, t: torch.Tensor, context: EncodedContext,
                 y: torch.Tensor | None = None, *, warmup: int = 2):
        # Checked first, on any device: another type failed at its first attribute with an AttributeError.
        # torch.compile(model) is taken as the model is: its wrapper runs the compiled forward and hands
        # on every other attribute (setup, positions) to the WanDiT it holds.
        if not isinstance(getattr(model, "_orig_mod", model), WanDiT):
            raise InputError(f"model must be a WanDiT, got {type(model).__name__}")
        for name, value in (("x", x), ("t", t), *((("y", y),) if y is not None else ())):
            if not isinstance(value, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(value).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral):
            raise InputError(f"warmup must be an integer, got {warmup!r}")
        if model.setup.parallel is not None:
            # Capturing the all-to-alls would rely on NCCL's support for graph capture, untested with dit8.
            raise InputError("CUDA-graph capture of a sequence-parallel model is not supported; run it eagerly")
        if not isinstance(context, EncodedContext):
            # A raw context would be encoded inside the capture, its copy to the device included, which
            # a capture cannot hold: the graph replays one encoded context.
            raise InputError(f"context must be the EncodedContext of model.encode_context(context, clip_fea), "
                             f"got {type(context).__name__}")
        device = model.setup.device
        if device.type != "cuda":
            raise InputError(f"CUDA-graph capture needs a model on a CUDA device, this one is on {device}")
        # Kept alive: the graph reads the weights' and the context's memory at every replay.
        self.model, self.context = model, context
        # Static inputs, in the dtype and on the device the forward works in, so it copies nothing.
        self.x = x.to(device, torch.float32, copy=True)
        self.t = t.to(device, copy=True)
        self.y = None if y is None else y.to(device, torch.float32, copy=True)

        # The model's device is made current throughout: the capture records the current device's
        # stream. Warm up on a side stream (the documented capture recipe): compiles the Triton
        # kernels, builds the RoPE table and lets the allocator settle before anything is recorded.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(max(warmup, 1)):
                    model(self.x, self.t, context, y=self.y)
            torch.cuda.current_stream(device).wait_stream(side)

            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.out = model(self.x, self.t, context, y=self.y)
        # The graph reads this grid's RoPE tables too: kept alive after the model's cache lets them go.
        self.positions = model.positions(model.patch_grid(self.x))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity for latents x at timesteps t (shapes as captured): replays the graph."""
        for name, new, static in (("x", x, self.x), ("t", t, self.t)):
            if not isinstance(new, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(new).__name__}")
            if new.shape != static.shape:
                raise InputError(f"{name} has shape {tuple(new.shape)}; the graph was captured for "
                                 f"{tuple(static.shape)}")
        with torch.cuda.device(self.x.device):
            self.x.copy_(x)
            self.t.copy_(t)
            self.graph.replay()
            return self.out.clone()
