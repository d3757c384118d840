"""Captions -> PNG files: the prior samples VQ tokens, the DiVAE decodes them.

    python -m divae.generate --prior runs/prior/prior.safetensors --divae runs/decoder_f8/divae.safetensors \
        --caption "a red square left of a blue circle" --seed 0 --num-images 4 --grid --out gen/
    python -m divae.generate --prior ... --divae ... --captions captions.txt --out gen/ --seeds 3,7 \
        --guidance-scale 3 --negative-prompt "blurry" --top-k 512 --sampler ddim --steps 25 --batch-size 8 \
        --precision bf16 --save-tokens --device cuda
    python -m divae.generate --divae other_divae.safetensors --from-tokens gen/ --decoder cnn --out gen_cnn/

Writes one PNG per caption and seed, `<out>/<caption number>_<caption words>_seed<seed>.png`, and
`<out>/index.json` listing each file with its caption, seed and the sampling settings. Each PNG carries text
chunks `caption`, `seed` and `divae` (JSON: the image's caption and seed, and the settings, the weights' sha256
included). The image of (caption, seed) depends only on them and the settings (the prior's token draws and the
decoder's noise come from a generator seeded with the seed), not on the batch size or the other captions: a
rerun gives the same image. --captions reads one caption per line (UTF-8; blank lines skipped). --prior may name
the prior stage's run folder: its best.safetensors (lowest validation loss) when it has one, else its
prior.safetensors; the choice is printed and recorded in index.json ("prior", "prior_choice").

Seeds: `--seed S --num-images N` gives seeds S..S+N-1 to every caption; `--seeds a,b,c` lists them instead (not
with --seed/--num-images). With neither, a random base seed is drawn, printed and kept in index.json
(`seed_base`): pass it as --seed to redo the run.
Resume: a PNG already in --out for the same (caption number, caption, seed) and the same settings is kept, not
made again (index.json still lists it, with "generated": false); one made with other settings stops the run
before any work, naming what differs: pass --overwrite to remake everything, or choose another --out.
--precision bf16 runs the prior and the decoder under torch.autocast(bfloat16) (fp32 by default).
--negative-prompt TEXT takes the empty caption's place in classifier-free guidance: neg + s * (cond - neg).
--save-tokens keeps each image's sampled token grid beside it, `<name>.tokens.npy` ((h, w) int16/int32, no
pickle); --from-tokens DIR decodes every such file of DIR again (another --divae, --decoder, --sampler or
--steps) without the prior: caption and seed come from DIR/index.json, else no caption and seed --seed
(default 0) + the file's place in name order; the prior's options are then unused.
--grid writes `<out>/grid.png`: the run's images, one row per caption, one column per seed (--from-tokens:
a near-square grid in name order). A progress bar goes to stderr when it is a terminal (else one line per
batch on stdout); --quiet prints nothing but errors.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
from pathlib import Path

import numpy as np
import torch

from divae.diffusion import SAMPLERS
from divae.generate_io import (
    Job,
    image_name,
    meta_difference,
    read_meta,
    save_png,
    save_tokens,
    to_uint8,
    token_jobs,
    tokens_name,
    write_grid,
)
from divae.utils.cli import UsageError, int_at_least, path_arg, run_cli, writable_dir
from divae.utils.files import atomic_file, sha256_file


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m divae.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default=None, help="prior weights (prior.safetensors of the prior stage), or the "
                   "prior stage's run folder: its best.safetensors (lowest validation loss), else prior.safetensors")
    p.add_argument("--divae", required=True, help="DiVAE weights (decoder export; a VQ export with --decoder cnn)")
    p.add_argument("--caption", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--captions", default=None, help="text file, one caption per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: a random one, printed)")
    p.add_argument("--num-images", type=int_at_least(1), default=None, help="images per caption (default 1)")
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds; one image per caption and "
                   "seed (instead of --seed/--num-images)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (1: off, 0: uncond)")
    p.add_argument("--negative-prompt", default=None, help="caption of guidance's unconditional branch "
                   "(default: the empty caption)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--decoder", choices=["diffusion", "cnn"], default="diffusion",
                   help="diffusion: DiVAE's decoder; cnn: the VQ's CNN decoder")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="diffusion sampler (default: the DiVAE file's own, a distilled student's; else ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the file's own with --sampler unset, else the sampler's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: prior and decoder under torch.autocast(bfloat16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per prior/decoder call")
    p.add_argument("--grid", action="store_true", help="also write <out>/grid.png (rows: captions, columns: seeds)")
    p.add_argument("--save-tokens", action="store_true", help="write <name>.tokens.npy beside each PNG")
    p.add_argument("--from-tokens", default=None, metavar="DIR",
                   help="decode DIR's *.tokens.npy again instead of sampling captions (no --prior)")
    p.add_argument("--overwrite", action="store_true", help="remake images already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
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


def resolve_seeds(args: argparse.Namespace) -> tuple[list[int], int | None]:
    """(the seeds of every caption, the base seed or None with --seeds). No --seed: a random base from the OS's
    entropy (secrets), printed unless --quiet."""
    if args.seeds is not None:
        if args.seed is not None or args.num_images is not None:
            raise UsageError("--seeds lists the seeds itself: drop --seed/--num-images, or drop --seeds")
        return args.seeds, None
    base = args.seed
    if base is None:
        base = secrets.randbelow(2**31)
        if not args.quiet:
            print(f"random base seed {base} (pass --seed {base} to make these images again)", flush=True)
    return list(range(base, base + (args.num_images or 1))), base


def resolve_prior(value: str, quiet: bool) -> tuple[Path, str]:
    """--prior as (the prior file, why that one) (`divae.prior_io.resolve_prior_path`: a run folder gives its best
    checkpoint), printed unless quiet; a UsageError when it names no file."""
    from divae.prior_io import resolve_prior_path

    try:
        path, why = resolve_prior_path(value)
    except FileNotFoundError as e:
        raise UsageError(f"--prior {e}") from None
    if not quiet:
        print(f"--prior: {why}", flush=True)
    return path_arg(path, "--prior"), why


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no file: numbers in range, options that go together; a UsageError otherwise."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    for flag, v in (("--guidance-scale", args.guidance_scale), ("--temperature", args.temperature)):
        if not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number, got {v}")
    if args.from_tokens is None and args.prior is None:
        raise UsageError("--prior is required (or --from-tokens DIR to decode saved tokens)")
    if args.prior is not None:
        args.prior, args.prior_choice = resolve_prior(args.prior, args.quiet)
    path_arg(args.divae, "--divae")
    if args.from_tokens is not None:
        used = [f for f, v in (("--prior", args.prior), ("--caption", args.caption), ("--captions", args.captions),
                               ("--seeds", args.seeds), ("--num-images", args.num_images),
                               ("--save-tokens", args.save_tokens)) if v]
        if used:
            raise UsageError(f"--from-tokens decodes saved tokens without the prior: drop {', '.join(used)}")
        if Path(args.out).resolve() == Path(args.from_tokens).resolve():
            raise UsageError("--out is the --from-tokens folder: its PNGs would be replaced; choose another --out")
    if args.precision == "bf16" and args.device.startswith("cuda") and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 support; use --precision fp32")


def load_divae(args: argparse.Namespace, device: torch.device):
    """The DiVAE of --divae on `device`, checked against --decoder; sets args.sampler to this CLI's fallback."""
    from divae.model import DiVAE

    divae = DiVAE.from_pretrained(args.divae, device=device).eval()
    if args.decoder == "diffusion" and divae.unet is None:
        raise UsageError(f"--divae {args.divae} holds no diffusion decoder (a VQ-stage export); use --decoder cnn")
    if args.decoder == "diffusion" and args.sampler is None and (args.steps is not None or divae.sampling is None):
        args.sampler = "ddim"  # this CLI's fallback (DDIM 25); a distilled file's own sampler otherwise
    return divae


def decoder_settings(args: argparse.Namespace) -> dict:
    """The settings of the decoder side, recorded in every PNG and index.json (the weights by sha256)."""
    return {"decoder": args.decoder, "sampler": args.sampler, "steps": args.steps, "precision": args.precision,
            "divae_sha256": sha256_file(args.divae)}


def plan(jobs: list[Job], out: Path, settings: dict, args: argparse.Namespace) -> list[Job]:
    """The jobs whose PNG must be made: missing, or --overwrite, or (--save-tokens) missing its tokens. A PNG
    made with another caption, seed or settings stops the run (UsageError) unless --overwrite."""
    todo, clash = [], []
    for job in jobs:
        path = out / job.name
        if args.overwrite or not path.exists():
            todo.append(job)
            continue
        old, new = read_meta(path), json.loads(json.dumps({"image": job.image, "settings": settings}))
        if old != new:
            clash.append((job.name, meta_difference(old, new)))
        elif args.save_tokens and not (out / tokens_name(job.name)).exists():
            todo.append(job)
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise UsageError(f"{out / clash[0][0]} exists from another run ({clash[0][1]}){more}: pass --overwrite to "
                         "remake it, or choose another --out")
    return todo


def produce(jobs: list[Job], out: Path, settings: dict, args: argparse.Namespace, render) -> list[dict]:
    """Make the PNGs (and tokens) of `plan`'s jobs in batches of --batch-size with `render(jobs) -> (images
    (B, 3, H, W) in [-1, 1], tokens (B, h, w))` under --precision; returns the index entries of all jobs."""
    from tqdm import tqdm

    todo = plan(jobs, out, settings, args)
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(todo), unit="img", disable=args.quiet or not tty, file=sys.stderr)
    vocab = settings["vocab_size"]
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        with torch.no_grad(), autocast:
            x, z = render(chunk)
        for job, img, grid in zip(chunk, to_uint8(x), z.cpu().numpy()):
            save_png(out / job.name, img, {"image": job.image, "settings": settings})
            if args.save_tokens:
                save_tokens(out / tokens_name(job.name), grid, vocab)
            else:  # the tokens of the image this one replaced
                (out / tokens_name(job.name)).unlink(missing_ok=True)
        bar.update(len(chunk))
        if not (args.quiet or tty):
            print(f"{start + len(chunk)}/{len(todo)} images made in {out}", flush=True)
    bar.close()
    made = {job.name for job in todo}
    if not args.quiet:
        print(f"{len(made)} images made, {len(jobs) - len(made)} kept from before, in {out}", flush=True)
    return [{"file": j.name, "caption": j.image.get("caption"), "seed": j.image["seed"],
             "generated": j.name in made,
             **({"tokens": tokens_name(j.name)} if (out / tokens_name(j.name)).exists() else {})} for j in jobs]


def finish(out: Path, header: dict, index: list[dict], args: argparse.Namespace, columns: int) -> None:
    """Write index.json (header + the images) and, with --grid, grid.png."""
    with atomic_file(out / "index.json") as f:
        f.write(json.dumps({**header, "images": index}, indent=1, ensure_ascii=False).encode("utf-8"))
    if args.grid:
        write_grid(out / "grid.png", [out / e["file"] for e in index], columns)


def generate(args: argparse.Namespace, out: Path) -> list[dict]:
    """Captions -> prior -> decoder -> PNGs; returns the index entries."""
    from divae.prior_io import load_prior
    from divae.t2i import text_to_image

    captions = read_captions(args)
    device = torch.device(args.device)
    try:
        prior, tokenizer = load_prior(args.prior, device=device)
    except ValueError as e:
        raise UsageError(f"--prior: {e}") from None
    divae = load_divae(args, device)
    if prior.cfg.image_vocab_size != divae.vq.cfg.n_embed:
        raise UsageError(f"--prior samples {prior.cfg.image_vocab_size} codes but --divae's codebook has "
                         f"{divae.vq.cfg.n_embed}: the prior must be trained on this VQ's tokens")
    if args.top_k is not None and not 1 <= args.top_k <= prior.cfg.image_vocab_size:
        raise UsageError(f"--top-k must be in [1, {prior.cfg.image_vocab_size}], got {args.top_k}")
    seeds, base = resolve_seeds(args)
    settings = {k: getattr(args, k) for k in ("guidance_scale", "negative_prompt", "temperature", "top_k", "top_p")}
    settings.update(decoder_settings(args), prior_sha256=sha256_file(args.prior), vocab_size=divae.vq.cfg.n_embed)
    jobs = [Job(image_name(i, c, s), {"caption_number": i, "caption": c, "seed": s})
            for i, c in enumerate(captions) for s in seeds]
    decode = divae_decoder(divae, args)

    def render(chunk: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        return text_to_image(prior, tokenizer, decode, [j.image["caption"] for j in chunk],
                             guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seeds=[j.image["seed"] for j in chunk],
                             negative_caption=args.negative_prompt, return_tokens=True)

    index = produce(jobs, out, settings, args, render)
    header = {"prior": str(args.prior), "prior_choice": args.prior_choice, "divae": str(args.divae), **settings,
              "seed_base": base, "seeds": seeds}
    finish(out, header, index, args, len(seeds))
    return index


def divae_decoder(divae, args: argparse.Namespace):
    """`decode(tokens (B, h, w), seeds=...) -> images (B, 3, H, W)` with --decoder, --sampler and --steps."""
    def decode(z: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        return divae.decode_tokens(z, sampler=args.sampler, steps=args.steps, seeds=seeds, decoder=args.decoder)
    return decode


def from_tokens(args: argparse.Namespace, out: Path) -> list[dict]:
    """Saved token grids -> decoder -> PNGs (no prior); returns the index entries."""
    folder = path_arg(args.from_tokens, "--from-tokens", kind="dir")
    device = torch.device(args.device)
    divae = load_divae(args, device)
    vocab = divae.vq.cfg.n_embed
    jobs = token_jobs(folder, vocab, 0 if args.seed is None else args.seed)
    settings = {"from_tokens": True, **decoder_settings(args), "vocab_size": vocab}
    decode = divae_decoder(divae, args)

    def render(chunk: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.from_numpy(np.stack([j.tokens for j in chunk])).to(device)
        return decode(z, seeds=[j.image["seed"] for j in chunk]), z

    index = produce(jobs, out, settings, args, render)
    finish(out, {"from_tokens": str(folder), "divae": str(args.divae), **settings}, index, args,
           math.ceil(math.sqrt(len(jobs))))
    return index


def main(argv: list[str] | None = None) -> list[dict]:
    """Generate (or decode saved tokens); returns the index entries (file, caption, seed, generated[, tokens])."""
    args = parse_args(argv)
    check_args(args)
    if args.from_tokens is None:
        read_captions(args)  # a bad caption is refused before any folder is made
    out = writable_dir(args.out, "--out")
    return generate(args, out) if args.from_tokens is None else from_tokens(args, out)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="python -m divae.generate")


if __name__ == "__main__":
    sys.exit(cli())
