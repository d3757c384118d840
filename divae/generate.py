"""Captions -> PNG files: the prior samples VQ tokens, the DiVAE decodes them.

    python -m divae.generate --prior runs/prior/prior.safetensors --divae runs/decoder_f8/divae.safetensors \
        --caption "a red square left of a blue circle" --seeds 0,1,2 --out gen/
    python -m divae.generate --prior ... --divae ... --captions captions.txt --out gen/ \
        --guidance-scale 3 --top-k 512 --sampler ddim --steps 25 --batch-size 8 --device cuda

Writes one PNG per caption and seed, `<out>/<caption number>_<caption words>_seed<seed>.png`, and
`<out>/index.json` listing each file with its caption, seed and the sampling settings. The image of (caption,
seed) depends only on them and the settings (the prior's token draws and the decoder's noise come from a
generator seeded with the seed), not on the batch size or the other captions: a rerun gives the same image.
--captions reads one caption per line (UTF-8; blank lines skipped). --prior may name the prior stage's run folder:
its best.safetensors (lowest validation loss) when it has one, else its prior.safetensors; the choice is printed
and recorded in index.json ("prior", "prior_choice").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from divae.diffusion import SAMPLERS
from divae.utils.cli import UsageError, path_arg, run_cli, writable_dir


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "caption"


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m divae.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="prior weights (prior.safetensors of the prior stage), or the "
                   "prior stage's run folder: its best.safetensors (lowest validation loss), else prior.safetensors")
    p.add_argument("--divae", required=True, help="DiVAE weights (decoder export; a VQ export with --decoder cnn)")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--captions", default=None, help="text file, one caption per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds; one image per caption and seed")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (1: off, 0: uncond)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--decoder", choices=["diffusion", "cnn"], default="diffusion",
                   help="diffusion: DiVAE's decoder; cnn: the VQ's CNN decoder")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="diffusion sampler (default: the DiVAE file's own, a distilled student's; else ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the file's own with --sampler unset, else the sampler's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per prior/decoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def read_captions(args: argparse.Namespace) -> list[str]:
    """The captions of --caption (each) and --captions (one per line), all UTF-8 text; a UsageError otherwise."""
    caps = list(args.caption)
    for i, c in enumerate(caps):
        try:
            c.encode("utf-8")
        except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
            bad = c[e.start].encode("utf-8", "surrogateescape")
            raise UsageError(f"--caption number {i + 1} is not UTF-8 text (byte 0x{bad.hex()} at character "
                             f"{e.start}); pass captions as UTF-8") from None
    if args.captions:
        path = path_arg(args.captions, "--captions")
        try:
            caps += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise UsageError(f"--captions {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not caps:
        raise UsageError("no captions: pass --caption TEXT (repeatable) or --captions FILE (one per line)")
    return caps


def resolve_prior(value: str) -> tuple[Path, str]:
    """--prior as (the prior file, why that one) (`divae.prior_io.resolve_prior_path`: a run folder gives its best
    checkpoint), printed; a UsageError when it names no file."""
    from divae.prior_io import resolve_prior_path

    try:
        path, why = resolve_prior_path(value)
    except FileNotFoundError as e:
        raise UsageError(f"--prior {e}") from None
    print(f"--prior: {why}", flush=True)
    return path_arg(path, "--prior"), why


def main(argv: list[str] | None = None) -> list[dict]:
    """Generate; returns the index entries (file, caption, seed)."""
    args = parse_args(argv)
    captions = read_captions(args)
    prior_path, prior_why = resolve_prior(args.prior)
    path_arg(args.divae, "--divae")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    out = writable_dir(args.out, "--out")
    from divae.model import DiVAE
    from divae.prior_io import load_prior
    from divae.t2i import text_to_image

    device = torch.device(args.device)
    try:
        prior, tokenizer = load_prior(prior_path, device=device)
    except ValueError as e:
        raise UsageError(f"--prior: {e}") from None
    divae = DiVAE.from_pretrained(args.divae, device=device).eval()
    if prior.cfg.image_vocab_size != divae.vq.cfg.n_embed:
        raise UsageError(f"--prior samples {prior.cfg.image_vocab_size} codes but --divae's codebook has "
                         f"{divae.vq.cfg.n_embed}: the prior must be trained on this VQ's tokens")
    if args.top_k is not None and not 1 <= args.top_k <= prior.cfg.image_vocab_size:
        raise UsageError(f"--top-k must be in [1, {prior.cfg.image_vocab_size}], got {args.top_k}")
    if args.decoder == "diffusion" and divae.unet is None:
        raise UsageError(f"--divae {args.divae} holds no diffusion decoder (a VQ-stage export); use --decoder cnn")
    if args.decoder == "diffusion" and args.sampler is None and (args.steps is not None or divae.sampling is None):
        args.sampler = "ddim"  # this CLI's fallback (DDIM 25); a distilled file's own sampler otherwise
    jobs = [(i, c, s) for i, c in enumerate(captions) for s in args.seeds]
    decode = partial(divae.decode_tokens, sampler=args.sampler, steps=args.steps, decoder=args.decoder)
    settings = {k: getattr(args, k) for k in ("guidance_scale", "temperature", "top_k", "top_p", "decoder",
                                              "sampler", "steps")}
    index = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        with torch.no_grad():
            x = text_to_image(prior, tokenizer, decode, [c for _, c, _ in chunk], guidance_scale=args.guidance_scale,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seeds=[s for _, _, s in chunk])
        imgs = ((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for (i, c, s), img in zip(chunk, imgs):
            name = f"{i:04d}_{_slug(c)}_seed{s}.png"
            Image.fromarray(img).save(out / name)
            index.append({"file": name, "caption": c, "seed": s})
        print(f"{min(start + args.batch_size, len(jobs))}/{len(jobs)} images written to {out}", flush=True)
    (out / "index.json").write_text(json.dumps({"prior": str(prior_path), "prior_choice": prior_why,
                                                "divae": str(args.divae), **settings, "images": index},
                                               indent=1, ensure_ascii=False))
    return index


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="python -m divae.generate")


if __name__ == "__main__":
    sys.exit(cli())
