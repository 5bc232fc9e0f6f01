"""Per-region prompts: which text embedding each region of a plan is denoised with (plain torch)."""
from __future__ import annotations

import math

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


CLIP_CHUNK = 77  # CLIP text encoders emit 77-token chunks, concatenated for long prompts


def same_length(embeddings: list[torch.Tensor], what: str = "prompts") -> list[torch.Tensor]:
    """Text embeddings (1, tokens, width) brought to one token count so they can be averaged or interpolated
    token by token. CLIP embeddings (whole 77-token chunks) are repeated chunk-wise to a common length, as
    ComfyUI itself batches CLIP prompts of different lengths; other encoders (T5, Qwen's) give a token per
    word piece, which cannot be lined up: those must already agree."""
    counts = [e.shape[-2] for e in embeddings]
    if len(set(counts)) == 1:
        return list(embeddings)
    if all(c % CLIP_CHUNK == 0 for c in counts):
        length = math.lcm(*counts)
        return [e.repeat(1, length // e.shape[-2], 1) for e in embeddings]
    raise ValueError(f"{what}: averaging or interpolating text embeddings needs them token by token, but these "
                     f"encode to {', '.join(map(str, counts))} tokens (a T5 or Qwen text encoder: one token per word "
                     f"piece). Use prompts that encode to the same length, or 'per factor' prompts with "
                     f"variable_prompts 'null'.")


def region_prompts(factor_prompts: list[torch.Tensor], factors_of: tuple[tuple[int, ...], ...], variables: str,
                   null_prompt: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The embedding for every region: a factor its own; an overlap the mean of the factors that
    contain it ("mean": equal prompts stay equal) or the null prompt ("null"). The same rule gives each
    region its pooled embedding (SDXL, SD3, Flux) from the factors' pooled ones."""
    out = []
    for sources in factors_of:
        if len(sources) == 1:
            out.append(factor_prompts[sources[0]])
        elif variables == "null":
            out.append(null_prompt)
        else:
            out.append(torch.stack(same_length([factor_prompts[i] for i in sources], "variable_prompts 'mean'")).mean(0))
    return tuple(out)


def crop_origins(plan) -> list[tuple[int, int]]:
    """Each region's offset in the canvas, in cells: its top-left cell. On a canvas that wraps around (a loop,
    a cubemap: some region is gathered from several pieces) there is no edge to measure from: every region is
    an uncropped image of its own there, (0, 0), so that a loop treats every place alike."""
    if any(len(r.pieces) > 1 or r.pieces[0].turns % 4 for r in plan.regions):
        return [(0, 0)] * len(plan.regions)
    return [r.pieces[0].src for r in plan.regions]


def window_size_conditioning(given: dict, origin: tuple[int, int], size: tuple[int, int], canvas: tuple[int, int],
                             px: int) -> dict:
    """SDXL's size conditioning (original size, crop offset, target size, in pixels) for one window of a canvas.

    SDXL was trained on crops: a target-size crop taken at (crop_h, crop_w) from an image of the original size.
    A window is exactly that: a window-size crop of the canvas at the window's offset. So each window sees the
    canvas as the original size (or the width/height the prompt sets), its own offset as the crop (added to the
    prompt's crop) and its own size as the target (unless the prompt sets one). A window covering the whole
    canvas gets ComfyUI's own defaults: the canvas size, no crop, the canvas as target."""
    (y, x), (h, w), (H, W) = origin, size, canvas
    return {"width": given.get("width", W * px), "height": given.get("height", H * px),
            "crop_w": given.get("crop_w", 0) + x * px, "crop_h": given.get("crop_h", 0) + y * px,
            "target_width": given.get("target_width", w * px), "target_height": given.get("target_height", h * px)}
