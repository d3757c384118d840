"""Prior sampling speed: image tokens per second with and without the KV cache.

    python bench/prior_sampling.py                              # tiny and base presets on CPU
    python bench/prior_sampling.py --presets base,large --device cuda --batch 8 --tokens 256
    python bench/prior_sampling.py --presets base --grid 32 --vocab 8192 --batch 8 --captions 30000
                                                                # the paper's f8 grid; cost of 30k captions

Weights are random (speed does not depend on them). Classifier-free guidance (default scale 3) doubles the
rows each step, as in real use. "tokens/s" counts generated image tokens over the whole batch, excluding
the one-off model construction; the text encoding is inside the timed region. --grid/--vocab replace the
preset's token grid (side) and codebook size (the paper's f8 prior: 32x32 = 1024 tokens, K = 8192). --captions N
prints the prior's share of an N-caption evaluation (e.g. MSCOCO's 30k) at the measured cached rate.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from divae.prior import PRIOR_PRESETS, PriorModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(preset: str, device: torch.device, batch: int, tokens: int | None, guidance: float,
          dtype: torch.dtype, repeats: int, no_cache_tokens: int | None, grid: int | None = None,
          vocab: int | None = None, captions: int | None = None) -> None:
    cfg = PRIOR_PRESETS[preset]
    if grid:
        cfg = replace(cfg, image_h=grid, image_w=grid)
    if vocab:
        cfg = replace(cfg, image_vocab_size=vocab)
    torch.manual_seed(0)
    model = PriorModel(cfg).to(device=device, dtype=dtype).eval()
    n = cfg.num_image_tokens if tokens is None else min(tokens, cfg.num_image_tokens)
    ids, mask = model.null_text(batch, device)
    ids[:, 2:10] = torch.randint(3, cfg.text_vocab_size, (batch, 8), device=device)
    ids[:, 10] = cfg.text_eos_id
    mask[:, :11] = True
    print(f"{preset}: {model.num_params() / 1e6:.1f}M params, grid {cfg.image_h}x{cfg.image_w}, "
          f"K={cfg.image_vocab_size}, batch {batch}, guidance {guidance}, {str(dtype).replace('torch.', '')}, {device}")
    for use_cache in (True, False):
        steps = n if use_cache or no_cache_tokens is None else min(n, no_cache_tokens)
        kw = dict(guidance_scale=guidance, temperature=1.0, top_k=100, seeds=list(range(batch)),
                  use_cache=use_cache, num_tokens=steps)
        model.sample(ids, mask, **{**kw, "num_tokens": min(steps, 4)})  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model.sample(ids, mask, **kw)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        rate = batch * steps / best
        print(f"  {'cache   ' if use_cache else 'no cache'}: {steps:4d} tokens/sample in {best:7.3f} s -> "
              f"{rate:9.1f} tokens/s ({1e3 * best / steps:.2f} ms/step)")
        if use_cache and captions:
            hours = captions * cfg.num_image_tokens / rate / 3600
            note = "" if steps == cfg.num_image_tokens else f" (extrapolated from the first {steps} tokens)"
            print(f"  {captions} captions x {cfg.num_image_tokens} tokens at this rate: {hours:.1f} h of prior "
                  f"sampling on this device{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,base", help="comma-separated names from PRIOR_PRESETS")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the whole grid)")
    ap.add_argument("--no-cache-tokens", type=int, default=64,
                    help="cap on tokens for the slow no-cache run (default 64; -1 for no cap)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--grid", type=int, default=None, help="token grid side (default: the preset's)")
    ap.add_argument("--vocab", type=int, default=None, help="codebook size K (default: the preset's)")
    ap.add_argument("--captions", type=int, default=None, help="print the prior cost of this many captions")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    cap = None if args.no_cache_tokens < 0 else args.no_cache_tokens
    for p in args.presets.split(","):
        bench(p.strip(), torch.device(args.device), args.batch, args.tokens, args.guidance,
              getattr(torch, args.dtype), args.repeats, cap, args.grid, args.vocab, args.captions)


if __name__ == "__main__":
    main()
