"""Sequence parallelism (Ulysses) for the DiT: P processes share one forward, each holding 1/P of the
tokens (spec/pipeline.md).

Everything in a Wan block but self-attention works token by token, so each rank runs it on its own
contiguous slice of the sequence. Around self-attention an all-to-all trades the token split for a head
split: rank r receives head group r of the whole sequence, attends locally, and the reverse all-to-all
brings the output back to its tokens. RoPE uses the tokens' global positions; the head's output is
gathered at the end. The embeddings, context and time modulation are computed on every rank alike.

Where P does not divide the token count, the sequence is padded at its end to a multiple of P. The
padding is cut off after the all-to-all, so attention sees only the real tokens (as queries and as
keys), and dropped after the gather: the result is that of the unpadded sequence.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


class GroupInputError(InputError):
    """An input error every process of a group raises alike (the processes disagree, a head count that
    does not split): the first process reports it, where each reports the inputs only it refused."""


@dataclass(frozen=True)
class SequenceParallel:
    """The process group a DiT forward is split over, and this process's place in it.

    Build it after `torch.distributed.init_process_group` (e.g. under `torchrun`) with
    `SequenceParallel.from_group()`; every rank of the group must run the same forwards with the same
    inputs (same seed), and each gets the whole result.
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> SequenceParallel:
        """The default process group (or `group`) of an initialised torch.distributed."""
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("sequence parallelism needs torch.distributed initialised first "
                             "(torch.distributed.init_process_group, e.g. under torchrun)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise InputError(f"this process (rank {dist.get_rank()}) is not a member of the group given")
        return cls(group, rank, dist.get_world_size(group))

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise InputError(f"a SequenceParallel needs 0 <= rank < world, got rank {self.rank} of {self.world}")

    def agree(self, what: str, fingerprint: int, device: torch.device, values: torch.Tensor | None = None,
              rtol: float = 1e-5) -> None:
        """Raise InputError on every rank unless all ranks give the same `fingerprint` (a 63-bit hash of
        what they are about to compute together) and, where given, the same `values` within `rtol` (a
        float64 vector of as many `checksums` on every rank): ranks given different inputs would exchange
        parts of different computations and return garbage, or hang."""
        # One float64 vector per rank: the fingerprint in two exact halves, then the values.
        mine = torch.tensor([fingerprint >> 32, fingerprint & 0xFFFFFFFF], dtype=torch.float64, device=device)
        if values is not None:
            mine = torch.cat([mine, values.to(device, torch.float64).reshape(-1)])
        prints = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(prints, mine, group=self.group)
        table = torch.stack(prints).cpu()
        same = (table[:, :2] == table[0, :2]).all(1) & torch.isclose(table[:, 2:], table[0, 2:], rtol=rtol, atol=0,
                                                                      equal_nan=True).all(1)
        if not same.all():
            differ = [r for r in range(self.world) if not same[r]]
            raise GroupInputError(f"sequence parallelism: the processes were given different {what} (ranks "
                                  f"{', '.join(map(str, differ))} differ from rank 0); every process must make "
                                  f"the same calls with the same inputs")

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any rank (all ranks must ask together)."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def check_heads(self, heads: int) -> None:
        """Raise InputError unless the attention heads split evenly over the ranks."""
        if heads % self.world:
            raise GroupInputError(f"sequence parallelism over {self.world} processes needs a head count "
                                  f"divisible by {self.world}; the model has {heads} heads")

    def local_length(self, tokens: int) -> int:
        """Tokens per rank: the sequence padded to a multiple of the world size, divided by it."""
        return -(-tokens // self.world)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `x` along `dim` (the token axis), zero-padded at the end of the sequence
        to local_length(x.shape[dim]) rows per rank."""
        tokens = x.shape[dim]
        local = self.local_length(tokens)
        start = self.rank * local
        part = x.narrow(dim, min(start, tokens), max(0, min(local, tokens - start)))
        if part.shape[dim] == local:
            return part
        pad = list(x.shape)
        pad[dim] = local - part.shape[dim]
        return torch.cat([part, x.new_zeros(pad)], dim)

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/P, H, D] (this rank's tokens, all heads) -> [B, L, H/P, D] (all tokens, head group
        `rank`), where L is the padded sequence length."""
        B, local, H, D = x.shape
        group_heads = H // self.world
        # Chunk j of dim 0 goes to rank j: this rank's tokens of head group j.
        send = x.reshape(B, local, self.world, group_heads, D).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        # Chunk i of dim 0 came from rank i: tokens i·L/P .. (i+1)·L/P of this rank's head group.
        return received.permute(1, 0, 2, 3, 4).reshape(B, self.world * local, group_heads, D)

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of tokens_to_heads: [B, L, H/P, D] -> [B, L/P, H, D]."""
        B, tokens, group_heads, D = x.shape
        local = tokens // self.world
        send = x.reshape(B, self.world, local, group_heads, D).transpose(0, 1).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        # Chunk i came from rank i: head group i of this rank's tokens.
        return received.permute(1, 2, 0, 3, 4).reshape(B, local, self.world * group_heads, D)

    def gather(self, x: torch.Tensor, dim: int, tokens: int) -> torch.Tensor:
        """Every rank's slice of `x` concatenated along `dim`, without the padding: `tokens` long."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim).narrow(dim, 0, tokens)


def fingerprint(*parts: object) -> int:
    """A 63-bit hash of `parts` that every process computes alike: tensors by dtype, shape and bytes,
    anything else by its repr (not Python's hash(), which differs between processes for strings)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(repr((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def checksums(device: torch.device, *tensors: torch.Tensor | None) -> torch.Tensor:
    """float64 [Σv⁺, Σv⁻, Σv², Σv⁺·i/n, Σv⁻·i/n] of each tensor's values v (positive and negative parts;
    index i of n; zeros for None), computed on `device` without a copy to the host: sums of non-negative
    terms, so the same values give the same sums to rounding however a device orders the additions, while
    other values (another seed, another prompt, a shift, frames in another order) change them. The parts
    are weighted apart so that -v differs from v unless two sums of zero-mean noise both happen to match
    (with one weighted sum of |v|, Σv⁺ ≈ Σv⁻ alone hid it, for about one draw in 3,000). For
    `SequenceParallel.agree`."""
    sums = []
    for t in tensors:
        if t is None or t.numel() == 0:
            sums.append(torch.zeros(5, dtype=torch.float64, device=device))
            continue
        v = t.detach().to(device, torch.float64).flatten()
        where = torch.linspace(0, 1, v.numel(), dtype=torch.float64, device=device)
        positive, negative = v.clamp(min=0), v.clamp(max=0).neg()
        sums.append(torch.stack([positive.sum(), negative.sum(), v.square().sum(), (positive * where).sum(),
                                 (negative * where).sum()]))
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)


# Integer types of each element width, to read a tensor's bits as numbers.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements summed at a time: a few hundred MB of int64 temporaries at most


def bits_fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """A 63-bit hash of the exact contents of `tensors` (the same on every process that holds the same
    bits), from two integer sums per tensor computed on its device: of its elements' bit patterns, and
    of each pattern times its index. Integer sums wrap modulo 2^64 whatever order a device adds in, so
    they are exact, need no tolerance and no float64 copy; one copy to the host for them all."""
    sums = []
    for t in tensors:
        bits = t.detach().reshape(-1).view(_BITS[t.element_size()])
        total = torch.zeros(2, dtype=torch.int64, device=t.device)
        for start in range(0, bits.numel(), _CHUNK):
            chunk = bits[start:start + _CHUNK].to(torch.int64)
            index = torch.arange(start + 1, start + 1 + chunk.numel(), dtype=torch.int64, device=t.device)
            total += torch.stack([chunk.sum(), (chunk * index).sum()])
        sums.append(total)
    return fingerprint(torch.stack(sums).cpu() if sums else None)


def join_launched_group(device: torch.device) -> tuple[SequenceParallel, torch.device]:
    """Join the process group a launcher such as `torchrun` describes in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA, gloo on the CPU. Returns the
    group and this process's device: on CUDA, GPU LOCAL_RANK (`device` must not name one)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise InputError(f"sequence parallelism: {', '.join(missing)} not set; start the processes with a "
                         f"launcher, e.g. torchrun --nproc-per-node 2 -m dit8 <command> ... --sequence-parallel")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        # (int() would take ' 1' and other scripts' digits, and say of 'x' only "invalid literal")
        if not re.fullmatch(r"[0-9]+", os.environ[name]):
            raise InputError(f"sequence parallelism: {name}={os.environ[name]!r} is not a whole number; start the "
                             f"processes with a launcher such as torchrun, which sets it")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not rank < world:
        raise InputError(f"sequence parallelism: RANK={rank} must be below WORLD_SIZE={world}")
    if device.type == "cuda":
        if device.index is not None:
            raise InputError(f"sequence parallelism puts each process on the GPU of its LOCAL_RANK; give the "
                             f"device as 'cuda', not {str(device)!r}")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SequenceParallel.from_group(), device
