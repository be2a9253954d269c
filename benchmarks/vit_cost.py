"""CPU inputs of the ViT cost model in docs/scale.md: what one image costs in each stage.

For each model it measures the forward FLOPs per image (torch's FLOP counter), the retain
pass (XLF importances, ``importance_sums``: forward + backward + |grad| accumulation) and the
forward pass alone (the search's Sf/proxy evaluations and the final evaluation) in images/s,
one dampening step (``dampen`` over the whole state), the bytes of one importance tensor
set and the time to pickle it (what a Ray shard ships back), and the JPEG decode + resize
rate of one core (imagefolder's ``fit``) on ILSVRC-sized synthetic images.

    python benchmarks/vit_cost.py            # vit-cpu 32 px, ViT-Ti/16 and ViT-B/16 at 224 px; ~5 min on 2 cores
    python benchmarks/vit_cost.py --smoke    # the small model only, a few images: checks the script
    python benchmarks/vit_cost.py --device cuda --batches 8   # the GPU figures docs/scale.md assumes

Its last line: ``vit_cost retain_ips_b16 A forward_ips_b16 B gflop_fwd_b16 C imp_mb_b16 D decode_ips E``.
"""
from __future__ import annotations

import argparse
import io
import pickle
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from potion.datasets.imagefolder import fit
from potion.models import create_model
from potion.unlearning.dampening import dampen
from potion.unlearning.importances import importance_sums

# (label, timm_name or None for Potion's sizing, image size, classes, batch size)
CASES = [
    ("vit-cpu 32px", None, 32, 10, 64),
    ("ViT-Ti/16 224px", "vit_tiny_patch16_224", 224, 1000, 16),
    ("ViT-B/16 224px", "vit_base_patch16_224", 224, 1000, 8),
]


def best_of(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_gflop(model, x) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops() / 1e9


def measure(label, timm_name, size, classes, batch, batches, repeats, device) -> dict:
    torch.manual_seed(0)
    kwargs = {} if timm_name is None else {"timm_name": timm_name}
    model = create_model("vit", num_classes=classes, in_channels=3, image_size=size, **kwargs).eval().to(device)
    data = [(torch.randn(batch, 3, size, size, device=device), torch.randint(0, classes, (batch,), device=device))
            for _ in range(batches)]
    n = batch * batches
    importance_sums(model, data[:1], "xlf", device=device)  # warm-up
    retain_s = best_of(lambda: importance_sums(model, data, "xlf", device=device), repeats, device)

    def forward():
        with torch.no_grad():
            for x, _ in data:
                model(x)

    forward_s = best_of(forward, repeats, device)
    imp, _ = importance_sums(model, data[:1], "xlf", device=device)
    state = model.state_dict()
    on_device = {k: v.to(device) for k, v in imp.items()}
    imp_r = {k: v + 1e-3 for k, v in on_device.items()}
    dampen_s = best_of(lambda: dampen(state, on_device, imp_r, alpha=1.0), repeats, device)
    arrays = {k: v.numpy() for k, v in imp.items()}
    t0 = time.perf_counter()
    blob = pickle.dumps(arrays, protocol=5)
    pickle_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {
        "label": label, "params": params, "gflop_fwd": forward_gflop(model, data[0][0]),
        "retain_ips": n / retain_s, "forward_ips": n / forward_s, "dampen_s": dampen_s,
        "imp_mb": sum(a.nbytes for a in arrays.values()) / 1e6, "pickle_mb_s": len(blob) / 1e6 / pickle_s,
    }


def decode_rate(n: int, size: int = 224) -> float:
    """Images/s of one core decoding a ~500×375 JPEG (ILSVRC's typical size) and fitting it."""
    rng = np.random.default_rng(0)
    # smooth noise compresses like a photo (~100 KB at quality 90), unlike white noise
    base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
    files = []
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        files.append(buf.getvalue())
    t0 = time.perf_counter()
    for b in files:
        with Image.open(io.BytesIO(b)) as img:
            fit(img.convert("RGB"), size)
    return n / (time.perf_counter() - t0), sum(map(len, files)) / n / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2, help="batches per timed pass (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes; the best is reported (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); fp32 either way")
    ap.add_argument("--smoke", action="store_true", help="the small model and a few images only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES[:1] if args.smoke else CASES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.device}")
    rows = []
    for label, name, size, classes, batch in cases:
        if args.smoke:
            batch = 4
        r = measure(label, name, size, classes, batch, args.batches, args.repeats, torch.device(args.device))
        rows.append(r)
        print(f"{r['label']:16s} params {r['params'] / 1e6:7.2f} M  forward {r['gflop_fwd']:7.3f} GFLOP/image  "
              f"retain pass {r['retain_ips']:8.1f} img/s  forward {r['forward_ips']:8.1f} img/s  "
              f"dampen {r['dampen_s']:6.2f} s  importances {r['imp_mb']:8.1f} MB (pickled at {r['pickle_mb_s']:.0f} MB/s)",
              flush=True)
    ips, kb = decode_rate(8 if args.smoke else 64)
    print(f"JPEG decode + fit to 224 px, one core: {ips:.1f} images/s ({kb:.0f} KB per image)")
    last = rows[-1]
    print(f"vit_cost retain_ips_b16 {last['retain_ips']:.2f} forward_ips_b16 {last['forward_ips']:.2f} "
          f"gflop_fwd_b16 {last['gflop_fwd']:.2f} imp_mb_b16 {last['imp_mb']:.1f} decode_ips {ips:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
