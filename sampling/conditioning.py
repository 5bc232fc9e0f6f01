"""Per-region prompts: which text embedding each region of a plan is denoised with (plain torch)."""
from __future__ import annotations

import torch

VARIABLE_PROMPTS = ("mean", "null")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of every token vector (last dim) from a (t = 0) to b (t = 1);
    the endpoints come back exactly."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1, keepdim=True) / (a64.norm(dim=-1, keepdim=True) * b64.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = sin.abs() < 1e-6  # (anti)parallel vectors: fall back to a straight line
    safe = torch.where(linear, torch.ones_like(sin), sin)
    wa = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(linear, t, torch.sin(t * omega) / safe)
    return (wa * a64 + wb * b64).to(a.dtype)


def along_chain(keys: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`count` embeddings moving through `keys` (at least 2) by piecewise slerp, evenly spaced:
    the first equals keys[0], the last keys[-1]."""
    if len(keys) < 2:
        raise ValueError("interpolation needs at least two prompts")
    out = []
    for k in range(count):
        position = k * (len(keys) - 1) / max(count - 1, 1)
        left = min(int(position), len(keys) - 2)
        out.append(slerp(keys[left], keys[left + 1], position - left))
    return out


def region_prompts(factor_prompts: list[torch.Tensor], factors_of: tuple[tuple[int, ...], ...], variables: str,
                   null_prompt: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The embedding for every region: a factor its own; an overlap the mean of the factors that
    contain it ("mean": equal prompts stay equal) or the null prompt ("null")."""
    out = []
    for sources in factors_of:
        if len(sources) == 1:
            out.append(factor_prompts[sources[0]])
        elif variables == "null":
            out.append(null_prompt)
        else:
            out.append(torch.stack([factor_prompts[i] for i in sources]).mean(0))
    return tuple(out)
