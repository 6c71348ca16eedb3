"""The 3D RoPE angle table of a patch grid (frame, row, column), built in float64 as the official code."""

from __future__ import annotations

import torch

# Positions per axis of the official model's RoPE table (`rope_params(1024, ...)`): a patch grid longer
# than that along any axis has no angles there (the reference fails), and the model never saw one.
MAX_POSITIONS = 1024


def rope_axis_widths(head_dim: int) -> tuple[int, int, int]:
    """Real channel widths given to (frame, row, column): 44/42/42 of 128."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def rope_table(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim/2] fp32 for the tokens of `grid` in order f·(H·W) + h·W + w.

    Pair j of an axis of real width D turns by `pos · theta^(−2j/D)`, pos the index along that axis.
    """
    per_axis = []
    for size, width in zip(grid, rope_axis_widths(head_dim)):
        inv_freq = theta ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
        per_axis.append(torch.outer(torch.arange(size, dtype=torch.float64), inv_freq))
    f, h, w = grid
    angles = torch.cat([
        per_axis[0][:, None, None, :].expand(f, h, w, -1),
        per_axis[1][None, :, None, :].expand(f, h, w, -1),
        per_axis[2][None, None, :, :].expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, head_dim // 2)
    return angles.cos().float().to(device), angles.sin().float().to(device)
