"""360 cubemaps: the cube's geometry, DiffCollage's hierarchical cubemap graph, and conversion
between a cube and an equirectangular image (plain torch).

The canvas is a strip of the six faces, each a square of S cells, in the order of `FACES`: the
horizon ring left, front, right, back (which already continue each other), then up and down.
Directions are (x right, y up, z front); on a face, u runs left to right and v top to bottom,
both over [-1, 1], as a camera at the cube's centre looking at that face sees it.

Other 360 tools (pytorch360convert, py360convert) lay the same face images out differently: `LAYOUTS`
names them, `cube_faces` / `cube_layout` convert (the canvas the graph samples is always the strip).

The graph (DiffCollage, supplementary A): the three 4-face loops LFRB, ULDR and UFDB are the
factors, and the opposite face pairs they share, {L, R}, {U, D}, {F, B}, the variables. Each loop
is itself a cycle factor graph of windows (a horizontal loop laid along the ring), and a face pair
is its two faces, denoised apart. Every face lies in two loops and one pair: 1 + 1 - 1 = 1.
"""
from __future__ import annotations

import math

import torch

from .conditioning import same_length
from .factor_graphs import cycle_factors, factor_region_plan
from .plans import Piece, PlanError, Region, RegionPlan

FACES = ("left", "front", "right", "back", "up", "down")
L, F, R, B, U, D = range(6)
# each ring: (face, quarter turns) in order; turned this way, every face's right edge meets the next
# face's left edge on the cube (tests/test_cubemap.py checks it cell by cell)
RINGS = {
    "LFRB": ((L, 0), (F, 0), (R, 0), (B, 0)),
    "ULDR": ((U, 2), (L, 1), (D, 0), (R, 3)),
    "UFDB": ((U, 1), (F, 1), (D, 1), (B, 3)),
}
PAIRS = ((L, R), (U, D), (F, B))


# Where the faces sit in each layout. Every layout shows a face the same way (as a camera at the cube's
# centre sees it, up at the top): pytorch360convert's and py360convert's face orientation, which is ours.
HORIZON = (F, R, B, L, U, D)   # pytorch360convert's 'horizon' strip and its list / stack / dict order
DICE_CELLS = {U: (0, 1), L: (1, 0), F: (1, 1), R: (1, 2), B: (1, 3), D: (2, 1)}  # (row, column): the 4x3 cross
LAYOUTS = {
    "strip": "6 faces in a row: left, front, right, back, up, down (the cubemap graph's canvas)",
    "horizon": "6 faces in a row: front, right, back, left, up, down (pytorch360convert / py360convert 'horizon')",
    "dice": "a 4x3 cross: up above front; left, front, right, back across; down below front (pytorch360convert "
            "'dice')",
    "faces": "a batch of 6 square images per cubemap: front, right, back, left, up, down (pytorch360convert "
             "'list' / 'stack' order)",
}


def cube_faces(image: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """The six faces (..., C, S, S) in the order of `FACES` of a cubemap image (..., C, H, W) in `layout`.
    For 'faces' the cubemaps are groups of 6 along the first (batch) dimension."""
    h, w = image.shape[-2:]
    if layout == "faces":
        if image.ndim != 4 or image.shape[0] % 6 or h != w:
            raise PlanError(f"a 'faces' cubemap is a batch of 6 square images per cubemap ({', '.join(FACES[f] for f in HORIZON)}); "
                            f"got a batch of {image.shape[0] if image.ndim == 4 else 1} of {w}x{h}")
        grouped = image.view(-1, 6, *image.shape[1:])
        return [grouped[:, HORIZON.index(f)] for f in range(6)]
    if layout == "dice":
        if w * 3 != h * 4:
            raise PlanError(f"a 'dice' cubemap is a cross 4 faces wide and 3 high (4:3); got {w}x{h}")
        size = h // 3
        return [image[..., r * size:(r + 1) * size, c * size:(c + 1) * size] for r, c in (DICE_CELLS[f] for f in range(6))]
    if layout not in ("strip", "horizon"):
        raise PlanError(f"unknown cubemap layout '{layout}' (known: {', '.join(LAYOUTS)})")
    size = check_strip((h, w), f"a '{layout}' cubemap")
    row = image.split(size, dim=-1)
    return list(row) if layout == "strip" else [row[HORIZON.index(f)] for f in range(6)]


def cube_layout(faces: list[torch.Tensor], layout: str) -> torch.Tensor:
    """The six faces (in the order of `FACES`) laid out as `layout`; the dice's empty cells are 0."""
    if layout == "strip":
        return torch.cat(faces, dim=-1)
    if layout == "horizon":
        return torch.cat([faces[f] for f in HORIZON], dim=-1)
    if layout == "faces":
        return torch.stack([faces[f] for f in HORIZON], dim=1).flatten(0, 1)
    if layout != "dice":
        raise PlanError(f"unknown cubemap layout '{layout}' (known: {', '.join(LAYOUTS)})")
    size = faces[0].shape[-1]
    out = faces[0].new_zeros(faces[0].shape[:-2] + (3 * size, 4 * size))
    for f, (r, c) in DICE_CELLS.items():
        out[..., r * size:(r + 1) * size, c * size:(c + 1) * size] = faces[f]
    return out


def convert_cube_layout(image: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """A cubemap image (B, C, H, W) from one layout to another."""
    return image if source == target else cube_layout(cube_faces(image, source), target)


def face_direction(face: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (x, y, z) direction (not normalised) of the point (u, v) of a face's plane; u, v may lie
    beyond [-1, 1] (the plane extended past the face's edges)."""
    one = torch.ones_like(u)
    x, y, z = {
        L: (-one, -v, u), F: (u, -v, one), R: (one, -v, -u),
        B: (-u, -v, -one), U: (u, one, v), D: (u, -one, -v),
    }[face]
    return torch.stack([x, y, z], dim=-1)


def direction_face(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(face, u, v) where each direction (..., 3) leaves the cube."""
    x, y, z = d.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    on_x = (ax >= ay) & (ax >= az)
    on_y = ~on_x & (ay >= az)
    on_z = ~on_x & ~on_y
    face = torch.where(on_x, torch.where(x > 0, R, L), torch.where(on_y, torch.where(y > 0, U, D), torch.where(z > 0, F, B)))
    u = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for f in range(6):
        m = face == f
        if not bool(m.any()):
            continue
        xm, ym, zm = x[m], y[m], z[m]
        u[m], v[m] = {
            L: (zm / -xm, ym / xm), R: (-zm / xm, -ym / xm),
            U: (xm / ym, zm / ym), D: (xm / -ym, zm / ym),
            F: (xm / zm, -ym / zm), B: (xm / zm, ym / zm),
        }[f]
    return face, u, v


def _cell_centres(count: int, size: int, start: int = 0, device=None) -> torch.Tensor:
    """Plane coordinates of cells start .. start+count-1 of a face `size` cells wide."""
    return (2 * (torch.arange(start, start + count, dtype=torch.float64, device=device) + 0.5) / size) - 1


def check_strip(strip_hw: tuple[int, int], what: str = "cubemap") -> int:
    """The face size S of a (S, 6 S) strip; a clear error for anything else."""
    h, w = strip_hw
    if w != 6 * h:
        raise PlanError(f"{what}: a cubemap is a strip of 6 square faces ({', '.join(FACES)}), 6 times as wide as "
                        f"high; got {w}x{h}")
    return h


def padded_face_index(size: int, face: int, pad: int, device=None) -> torch.Tensor:
    """For each cell of `face` grown by `pad` cells on every side, the flat strip index (row * 6S + col)
    of the cell the cube shows there: the face itself inside, its neighbours (as a camera with a
    wider view would see them) in the margin."""
    c = _cell_centres(size + 2 * pad, size, -pad, device)
    v, u = torch.meshgrid(c, c, indexing="ij")
    f, fu, fv = direction_face(face_direction(face, u, v))
    col = ((fu + 1) / 2 * size).floor().clamp(0, size - 1).long()
    row = ((fv + 1) / 2 * size).floor().clamp(0, size - 1).long()
    return row * (6 * size) + f * size + col


def pad_faces(strip: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """The six faces of a (..., S, 6S) strip, each grown by `pad` cells of its cube neighbours."""
    size = check_strip(tuple(strip.shape[-2:]))
    flat = strip.flatten(-2)
    return [flat[..., padded_face_index(size, f, pad, strip.device)] for f in range(6)]


def cube_to_equirect(strip: torch.Tensor, height: int | None = None) -> torch.Tensor:
    """An equirectangular image (..., height, 2 height) of a cube strip (..., S, 6S), bilinear;
    longitude 0 (the front face) at the centre, up at the top. Default height: 2 S."""
    size = check_strip(tuple(strip.shape[-2:]))
    height = height or 2 * size
    lead = strip.shape[:-2]
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64, device=strip.device) + 0.5) / height * math.pi
    lon = (torch.arange(2 * height, dtype=torch.float64, device=strip.device) + 0.5) / (2 * height) * 2 * math.pi - math.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    d = torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)
    face, u, v = direction_face(d)
    faces = pad_faces(strip.reshape(-1, *strip.shape[-3:]) if strip.ndim > 3 else strip[None], 1)
    out = strip.new_zeros(faces[0].shape[:2] + (height, 2 * height))
    for f in range(6):
        m = face == f
        # padded face: the face spans pixel edges 1 .. S+1 of S+2 pixels
        gx = (u[m] * size / (size + 2)).to(strip.dtype)
        gy = (v[m] * size / (size + 2)).to(strip.dtype)
        grid = torch.stack([gx, gy], -1)[None, None].expand(faces[f].shape[0], -1, -1, -1)
        out[..., m] = torch.nn.functional.grid_sample(faces[f], grid, mode="bilinear", align_corners=False)[:, :, 0]
    return out.reshape(*lead[:-1], strip.shape[-3], height, 2 * height) if strip.ndim > 3 else out[0]


def equirect_to_cube(image: torch.Tensor, size: int) -> torch.Tensor:
    """The cube strip (..., size, 6 size) seen in an equirectangular image (..., h, 2h), bilinear,
    wrapping around in longitude."""
    h, w = image.shape[-2:]
    if w != 2 * h:
        raise PlanError(f"equirectangular image: expected twice as wide as high (360 x 180 degrees), got {w}x{h}")
    batch = image.reshape(-1, *image.shape[-3:]) if image.ndim > 3 else image[None]
    wrapped = torch.cat([batch[..., -1:], batch, batch[..., :1]], dim=-1)  # longitude is periodic
    c = _cell_centres(size, size, device=image.device)
    v, u = torch.meshgrid(c, c, indexing="ij")
    faces = []
    for f in range(6):
        d = face_direction(f, u, v)
        d = d / d.norm(dim=-1, keepdim=True)
        lon = torch.atan2(d[..., 0], d[..., 2])
        lat = torch.asin(d[..., 1].clamp(-1, 1))
        gx = (lon / math.pi) * w / (w + 2)
        gy = -lat / (math.pi / 2)
        grid = torch.stack([gx, gy], -1).to(image.dtype)[None].expand(batch.shape[0], -1, -1, -1)
        faces.append(torch.nn.functional.grid_sample(wrapped, grid, mode="bilinear", padding_mode="border",
                                                     align_corners=False))
    strip = torch.cat(faces, dim=-1)
    return strip.reshape(*image.shape[:-2], size, 6 * size) if image.ndim > 3 else strip[0]


def ring_strip(faces: list[torch.Tensor], ring) -> torch.Tensor:
    """The 4 faces of a loop (`RINGS` entry) turned and side by side: one seamless horizontal loop."""
    return torch.cat([torch.rot90(faces[f], k, dims=(-2, -1)) for f, k in ring], dim=-1)


def crossing_weight(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Per pixel of an n x n face seen along a loop, the share of that loop, which crosses the face's
    left and right edges: 1 there, 0 at the top and bottom edges, 1/2 on the diagonals. The face's
    other loop crosses the other two edges and, turned back to the face, takes the rest."""
    d = torch.minimum(torch.arange(n, device=device), torch.arange(n, device=device).flip(0)).to(dtype)
    dx, dy = d[None, :], d[:, None]
    total = dx + dy
    return torch.where(total > 0, dy / total.clamp_min(1), torch.full_like(total, 0.5))


def _ring_piece(ring: str, size: int, y: int, x: int, h: int, w: int, dst: tuple[int, int]) -> Piece:
    """The canvas piece showing columns x .. x+w, rows y .. y+h of a ring laid out as one strip
    (those columns lie on one face of the ring)."""
    face, turns = RINGS[ring][x // size]
    ids = torch.arange(size * size).view(size, size)
    x0 = x % size
    block = torch.rot90(ids, turns, dims=(0, 1))[y:y + h, x0:x0 + w]
    rows, cols = block.div(size, rounding_mode="floor"), block % size
    sy, sx = int(rows.min()), int(cols.min())
    return Piece((sy, face * size + sx), dst, (int(rows.max()) - sy + 1, int(cols.max()) - sx + 1), turns)


def _on_cube(ring: str, size: int, region: Region) -> Region:
    """A region of the ring strip (S, 4S) as pieces of the cube strip, split where faces meet."""
    pieces = []
    for p in region.pieces:
        (y, x), (dy, dx), (h, w) = p.src, p.dst, p.size
        done = 0
        while done < w:
            run = min(w - done, size - (x + done) % size)
            pieces.append(_ring_piece(ring, size, y, x + done, h, run, (dy, dx + done)))
            done += run
    return Region(region.size, tuple(pieces))


def cubemap_plan(size: int, window: int, overlap: int, anchor: int = 0) -> RegionPlan:
    """DiffCollage's cubemap graph on a strip of faces of `size` cells: each loop a cycle of windows
    `window` cells long with `overlap`, each face pair its two faces at coefficient -1. Regions that
    coincide (a window exactly on a face, as a pair sees it) are merged and their coefficients
    added; those that cancel are left out, except the anchor window, kept at coefficient 0 so the anchor is
    always the window the user chose. Windows come first, loop by loop (LFRB, ULDR, UFDB).

    factors_of: a window region is its own factor, (i,); any other region (an overlap, a face of a pair)
    lists the window regions whose canvas cells contain all of its cells (empty when no single window
    does, e.g. a face with windows narrower than a face)."""
    ring_canvas = (size, 4 * size)
    if window > 4 * size or (4 * size) % (window - overlap) or 4 * size // (window - overlap) < 3:
        raise PlanError(f"cubemap: each loop of 4 faces ({4 * size} cells around) must be a whole number, at least 3, "
                        f"of window - overlap ({window - overlap} cells): e.g. window = face size and overlap = half "
                        f"of it")
    coefficient: dict[Region, float] = {}
    windows: list[Region] = []
    for ring in RINGS:
        boxes = cycle_factors(ring_canvas, (size, window), overlap)
        plan = factor_region_plan(ring_canvas, boxes, wrap_x=True)
        for index, (region, c) in enumerate(zip(plan.regions, plan.coefficients)):
            region = _on_cube(ring, size, region)
            if index < len(boxes):
                windows.append(region)
            coefficient[region] = coefficient.get(region, 0.0) + c
    for pair in PAIRS:
        for face in pair:
            region = Region((size, size), (Piece((0, face * size), (0, 0), (size, size)),))
            coefficient[region] = coefficient.get(region, 0.0) - 1.0
    if not 0 <= anchor < len(windows):
        raise PlanError(f"anchor {anchor} is past the last window of the cubemap ({len(windows)} windows)")
    # the anchor is the window the user chose, also when it cancelled out of the merge: it is then kept
    # at coefficient 0: it adds nothing to the merge, and a sampler needs its prediction only as the anchor
    chosen = windows[anchor]
    kept = [r for r in windows if coefficient[r] != 0 or r == chosen]
    kept += [r for r, c in coefficient.items() if c != 0 and r not in kept]
    is_window = set(windows)
    cells = [r.cells() for r in kept]
    factors_of = tuple((i,) if r in is_window else
                       tuple(j for j, w in enumerate(kept) if w in is_window and cells[i] <= cells[j])
                       for i, r in enumerate(kept))
    return RegionPlan((size, 6 * size), tuple(kept), tuple(coefficient[r] for r in kept), 0, kept.index(chosen),
                      factors_of)


def face_cells(plan: RegionPlan, index: int) -> tuple[int, ...]:
    """The faces region `index` of a cubemap plan touches (for per-face prompts)."""
    size = plan.canvas[0]
    return tuple(sorted({p.src[1] // size for p in plan.regions[index].pieces}))


def face_prompts(plan: RegionPlan, per_face: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each region's embedding (or pooled embedding): the mean of the faces it touches (a face alone: its own)."""
    if len(per_face) != 6:
        raise PlanError(f"prompts: a cubemap takes one prompt per face ({', '.join(FACES)}): 6, got {len(per_face)}")
    return tuple(torch.stack(same_length([per_face[f] for f in face_cells(plan, i)])).mean(0)
                 for i in range(len(plan.regions)))
