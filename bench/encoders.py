"""Encode time per input for every encoder branch (random weights; figures only, no asserts).

    python bench/encoders.py                 # parity-a sizes on the CPU (toy preset if the fixture is absent)
    python bench/encoders.py --huge          # also ImageBind-Huge + Point-Bind in fp16, if a CUDA GPU exists

Columns: preprocessing (file -> tensor; filled in once ibllm.media exists, see ``preprocess_ms``), the point
grouping alone (FPS + kNN), and the encoder forward (tensor -> embedding), all per input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere, no install needed

from ibllm.config import IMAGEBIND_HUGE, PRESETS, ImageBindConfig, from_reference_json  # noqa: E402
from ibllm.encoders import ImageBind, group_points, input_shape  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "parity-a"
ROWS = ("vision", "video", "text", "audio", "depth", "thermal", "imu", "point")


def preprocess_ms(row: str) -> float | None:
    """Hook for the media loaders' time per file (None: not measured yet)."""
    return None


def make_input(cfg: ImageBindConfig, row: str, batch: int, device: torch.device) -> tuple[str, torch.Tensor]:
    """Model-ready random input: images (B,3,H,W), video as 3 clips, audio as 3 clips (the loaders' defaults)."""
    if row == "vision":
        return "vision", torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if row == "video":
        return "vision", torch.randn(batch, 3, *input_shape(cfg, "vision"), device=device)
    if row == "text":
        ids = torch.randint(1, cfg.text_vocab_size - 1, (batch, cfg.text_context), device=device)
        ids[:, 12] = cfg.text_vocab_size - 1
        return "text", ids
    if row == "audio":
        return "audio", torch.randn(batch, 3, *input_shape(cfg, "audio"), device=device)
    return row, torch.randn(batch, *input_shape(cfg, row), device=device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(title: str, cfg: ImageBindConfig, device: torch.device, dtype: torch.dtype, batch: int,
          repeats: int) -> None:
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageBind(cfg)
    model = model.to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{title}: {params / 1e6:.1f} M parameters, {device.type} {str(dtype).removeprefix('torch.')}, "
          f"batch {batch}, median of {repeats}")
    print(f"{'input':<8} {'shape':<26} {'preprocess':>11} {'grouping':>10} {'encode':>10}  (ms per input)")
    with torch.inference_mode():
        for row in ROWS:
            modality, x = make_input(cfg, row, batch, device)
            encode = timed(lambda m=modality, x=x: model(m, x), repeats, device) / batch * 1e3
            grouping = "-"
            if modality == "point":
                p = cfg.point
                seconds = timed(lambda x=x, p=p: group_points(x, p.num_group, p.group_size), repeats, device)
                grouping = f"{seconds / batch * 1e3:.2f}"
            pre = preprocess_ms(row)
            shape = "x".join(map(str, x.shape[1:]))
            print(f"{row:<8} {shape:<26} {'-' if pre is None else f'{pre:.2f}':>11} {grouping:>10} {encode:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--huge", action="store_true", help="also ImageBind-Huge (fp16), if CUDA is available")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if (FIXTURE / "config.json").is_file():
        tiny, name = from_reference_json(FIXTURE / "config.json").imagebind, "parity-a sizes"
    else:
        tiny, name = PRESETS["toy"].imagebind, "toy preset (parity-a fixture not found)"
    bench(name, tiny, torch.device("cpu"), torch.float32, args.batch, args.repeats)

    if args.huge:
        if not torch.cuda.is_available():
            print("\n--huge: no CUDA GPU, skipped")
            return
        bench(f"ImageBind-Huge + Point-Bind ({torch.cuda.get_device_name()})", IMAGEBIND_HUGE,
              torch.device("cuda"), torch.float16, args.batch, args.repeats)
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
