"""How long a picture answer takes: the tiny random pipeline end to end, and full-size UNet/VAE steps.

    python bench/picture.py              # tiny pipeline through the engine's loader + full-size UNet/VAE timing
    python bench/picture.py --no-full    # the tiny pipeline only (seconds)
    python bench/picture.py --device cuda --dtypes float16

1. The tiny random pipeline (``ibllm.unclip_random``, 32×32 pictures) written to a temporary folder and drawn
   through ``ibllm.imagine.Painter``, the path the chat uses: load time, s/step with guidance on and off.
2. The real pipeline's UNet (865 M parameters, 96×96 latents = 768×768 pictures) and VAE decoder at full size with
   random weights (nothing is downloaded): one denoising step at batch 2 (guidance on: the unconditional and the
   conditioned half together) and batch 1 (guidance ≤ 1), and with ``--vae`` one decode, per dtype. Peak RSS is
   printed (float32 weights are 3.5 GB; a float32 768×768 decode on a CPU peaks at ~7.3 GB). A 20-step picture
   costs about 20 UNet steps plus one decode.
Figures, not tests: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.config import PictureConfig  # noqa: E402
from ibllm.imagine import Painter  # noqa: E402
from ibllm.unclip_random import FULL_UNET, FULL_VAE, write_random_unclip  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def tiny(device: torch.device, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = write_random_unclip(Path(tmp) / "tiny", embed_dim=1024)
        print(f"tiny pipeline written in {time.perf_counter() - t0:.1f} s (includes importing diffusers)")
        painter = Painter(str(folder), device, torch.float32, 1024)
        feature = torch.nn.functional.normalize(torch.randn(1, 1024), dim=-1)
        for guidance in (10.0, 1.0):
            for run in ("first", "warm"):
                options = PictureConfig(steps=steps, guidance=guidance, seed=0)
                last = list(painter.paint(feature, "a red cube", options))[-1]
                t = last.timings
                print(f"tiny, guidance {guidance:g}, {run}: {t.summary()}; {last.image.width}×{last.image.height}")


@torch.no_grad()
def full(device: torch.device, dtypes: list[str], repeats: int, decode: bool) -> None:
    # Optional package, slow to import: only for this part of the bench.
    from diffusers import AutoencoderKL, UNet2DConditionModel

    t0 = time.perf_counter()
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * 1024, **FULL_UNET).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **FULL_VAE).eval()
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"full-size UNet {params:.0f} M + VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M parameters "
          f"built in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_gb():.1f} GB")
    size = FULL_UNET["sample_size"]
    for name in dtypes:
        dtype = DTYPES[name]
        unet.to(device=device, dtype=dtype)  # in place: one copy of the weights at a time
        vae.to(device=device, dtype=dtype)
        for batch in (2, 1):
            latents = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
            text = torch.randn(batch, 77, 1024, device=device, dtype=dtype)
            image = torch.randn(batch, 2 * 1024, device=device, dtype=dtype)
            times = []
            for _ in range(repeats + 1):  # the first call warms up
                t0 = time.perf_counter()
                unet(latents, 500, encoder_hidden_states=text, class_labels=image)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            best = min(times[1:]) if repeats else times[0]
            print(f"full-size UNet step, {name}, batch {batch} (guidance {'on' if batch == 2 else 'off'}): "
                  f"{best:.2f} s; a 20-step picture ≈ {20 * best / 60:.1f} min of UNet; "
                  f"peak RSS {peak_rss_gb():.1f} GB")
        if not decode:
            continue
        t0 = time.perf_counter()
        vae.decode(torch.randn(1, 4, size, size, device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"full-size VAE decode {size * 8}×{size * 8}, {name}: {time.perf_counter() - t0:.1f} s; "
              f"peak RSS {peak_rss_gb():.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="steps of the tiny pipeline's pictures")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=1, help="timed full-size steps after the warm-up")
    parser.add_argument("--no-full", action="store_true", help="skip the full-size UNet/VAE timing")
    parser.add_argument("--vae", action="store_true",
                        help="also time a full-size VAE decode (768×768 in float32 peaks at ~7.3 GB RSS on a CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    tiny(device, args.steps)
    if not args.no_full:
        full(device, args.dtypes, args.repeats, args.vae)


if __name__ == "__main__":
    main()
