"""Coherence metrics (plain torch) with pluggable perceptual networks."""
import pytest
import torch

from comfy_host import load_sampling

load_sampling()
from controlsync_sampling import metrics as M  # noqa: E402


def l1(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_crops_follow_the_protocol_and_refuse_small_images():
    image = torch.zeros(3, 512, 3072)
    assert len(M.crops(image, 512)) == 6 and len(M.crops(image, 512, 256)) == 11
    with pytest.raises(ValueError, match="smaller than one crop of 512 px"):
        M.crops(torch.zeros(3, 256, 1024), 512)


def test_intra_lpips_is_zero_for_a_repeated_tile_and_grows_with_drift():
    g = torch.Generator().manual_seed(0)
    tile = torch.rand(3, 64, 64, generator=g) * 2 - 1
    repeated = tile.repeat(1, 1, 6)
    drifting = torch.cat([tile + 0.1 * k for k in range(6)], dim=-1)
    assert M.intra_lpips(repeated, l1, 64) == 0.0
    assert M.intra_lpips(drifting, l1, 64) == pytest.approx(sum(0.1 * abs(i - j) for i in range(6) for j in range(i + 1, 6)) / 15, rel=1e-4)


def test_style_loss_sees_texture_statistics():
    g = torch.Generator().manual_seed(1)
    smooth = torch.randn(3, 32, 32, generator=g) * 0.1
    rough = torch.randn(3, 32, 32, generator=g)

    def features(x):
        return [x, F_avg(x)]

    def F_avg(x):
        return torch.nn.functional.avg_pool2d(x, 2)
    same = torch.cat([smooth, smooth.flip(-1)], dim=-1)
    mixed = torch.cat([smooth, rough], dim=-1)
    assert M.intra_style_loss(same, features, 32) < 1e-12 < M.intra_style_loss(mixed, features, 32)


def test_seam_score_is_one_for_a_periodic_image_and_large_for_a_cut():
    x = torch.arange(256, dtype=torch.float32)
    periodic = (1 - (x - 128).abs() / 64).expand(3, 16, 256)  # a triangle wave: every column step equal
    assert M.seam_score(periodic) == pytest.approx(1.0, rel=1e-4)
    cut = (x / 256).expand(3, 16, 256)  # a ramp: the wrap jumps back
    assert M.seam_score(cut) > 10
    stepped = periodic.clone()
    stepped[..., 128:] += 1.0
    assert M.seam_score(stepped, columns=[128]) > 10


def test_edge_f1_with_tolerance():
    cond = torch.zeros(64, 64)
    cond[:, 30:] = 1.0
    image = torch.zeros(3, 64, 64)
    image[:, :, 31:] = 1.0  # the same edge, one pixel off
    edges = M.sobel_edges(image)
    assert M.edge_f1(edges, M.sobel_edges(cond), tolerance=2) > 0.9
    assert M.edge_f1(edges, torch.zeros(64, 64, dtype=torch.bool)) == 0.0
    far = torch.zeros(3, 64, 64)
    far[:, :, 5:] = 1.0
    assert M.edge_f1(M.sobel_edges(far), M.sobel_edges(cond), tolerance=2) < 0.1


def test_drift_profile_is_zero_at_the_anchor():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(3, 32, 128, generator=g)
    windows = [image[:, :, x:x + 32] for x in (0, 32, 64, 96)]
    profile = M.drift_profile(windows, 1, l1)
    assert profile[1] == 0.0 and all(v > 0 for i, v in enumerate(profile) if i != 1)


def test_evaluate_command_prints_json_and_refuses_bad_input(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    import lpips_weights
    lpips_dir = lpips_weights.LPIPS_DIR
    lpips_weights.write_lpips_backbones(lpips_dir)
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"
    Image.fromarray((rng.random((64, 256, 3)) * 255).astype("uint8")).save(wide)
    edges = tmp_path / "edges.png"
    Image.fromarray((rng.random((64, 256, 3)) > 0.9).astype("uint8") * 255).save(edges)
    pack = Path(__file__).resolve().parent.parent

    def run(*args):
        return subprocess.run([sys.executable, "-m", "sampling.evaluate", *args, "--lpips-net", "alex",
                               "--lpips-dir", str(lpips_dir)], cwd=pack, capture_output=True, text=True)
    proc = run(str(wide), "--crop", "64", "--condition", str(edges), "--window", "64", "--window-stride", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert 0 < row["intra_lpips"] < 1 and row["intra_style"] > 0 and 0 <= row["edge_f1"] <= 1
    assert len(row["drift"]) == 7 and row["drift"][0] == 0.0 and row["seam_score"] > 0
    assert row["style_features"].startswith("LPIPS VGG16")
    # with torchvision's VGG19 file beside the LPIPS files, the paper's VGG19 style layers are used
    vgg19 = tmp_path / "vgg19"
    vgg19.mkdir()
    g = torch.Generator().manual_seed(0)
    state, channels, index = {}, 3, 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]:
        if v == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(v, channels, 3, 3, generator=g) * 0.05
        state[f"features.{index}.bias"] = torch.zeros(v)
        channels, index = v, index + 2
    torch.save(state, vgg19 / "vgg19-dcbb9e9d.pth")
    proc = run(str(wide), "--crop", "64", "--lpips-dir", str(vgg19), "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["style_features"].startswith("VGG19") and row["intra_style"] > 0
    proc = run(str(wide), "--crop", "128")
    assert proc.returncode == 2 and "smaller than one crop of 128 px" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sampling.evaluate", str(wide), "--lpips-dir", str(tmp_path)],
                          cwd=pack, capture_output=True, text=True, env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin"})
    assert proc.returncode == 2 and "vgg16-397923af.pth" in proc.stderr and "models/lpips" in proc.stderr


def test_grid_seam_score_finds_a_step_at_the_border_it_is_given():
    g = torch.Generator().manual_seed(5)
    smooth = torch.rand(3, 32, 48, generator=g) * 0.1
    assert 0.5 < M.grid_seam_score(smooth, rows=[16], columns=[24]) < 2.0  # noise: like any other step
    cut = smooth.clone()
    cut[:, :, 24:] += 0.5  # a tile to the right made brighter
    cut[:, 16:, :] -= 0.3  # and the lower tiles darker
    # by hand: across the column border |step| ~ 0.5 (+ noise), across the row border ~ 0.3; interior ~ 0.033
    assert M.grid_seam_score(cut, columns=[24]) > 8 and M.grid_seam_score(cut, rows=[16]) > 5
    assert M.grid_seam_score(cut, rows=[8], columns=[12]) < 2.0  # borders elsewhere see no seam
    with pytest.raises(ValueError, match="boundaries"):
        M.grid_seam_score(cut)


def test_psnr_by_hand():
    a = torch.zeros(3, 4, 4)
    assert M.psnr(a, a) == float("inf")
    assert M.psnr(a, a + 0.2) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 0.04)).item(), rel=1e-9)  # 20 dB


def test_tile_colour_drift_is_zero_for_a_common_shift_and_the_spread_otherwise():
    g = torch.Generator().manual_seed(6)
    before = torch.rand(3, 16, 32, generator=g)
    tiles = [(0, 0, 16, 16), (0, 16, 16, 16)]
    assert M.tile_colour_drift(before + 0.25, before, tiles) == pytest.approx(0.0, abs=1e-6)
    after = before.clone()
    after[:, :, 16:] += 0.2  # one tile shifted by 0.2, the other not: std of (0, 0.2) = 0.1414
    assert M.tile_colour_drift(after, before, tiles) == pytest.approx(0.2 / 2 ** 0.5, rel=1e-5)
