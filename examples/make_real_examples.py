"""Write the real-world example gallery into examples/real/ (files + gallery.json).

    python examples/make_real_examples.py [--out examples/real]

The app shows this gallery when real (non-default) ImageBind-LLM weights are loaded. The project cannot
download media and will not ship third-party files of unclear licence, so every file here is *synthesised* by
this script from numpy/PIL drawing: everyday subjects the real model can talk about (a landscape, a bouncing
ball, a doorbell, a chair, a corridor, a person seen in infrared, a walk, a short description), one per
modality, small enough to keep in the repository. The output is CC0 (see examples/real/README.md).

Every generator is seeded, so rerunning rewrites the same files. There are no "expect" words: nobody here can
check what the 7B model answers, so the questions are open ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout, without installing the package
    sys.path.insert(0, str(REPO))

# The toy world's writers: the same mp4 / ply / wav encodings the media loaders are tested on.
from make_examples import main, write_gallery  # noqa: E402  (this folder: sys.path[0] of a script)

from ibllm.train.toyworld import write_mp4, write_ply, write_wav  # noqa: E402

SEED = 20240601
AUDIO_RATE = 16000  # what the audio loader resamples to anyway: storing more would only make the file bigger
IMU_RATE = 200  # Hz; 10 s = the 2000 steps ImageBind's IMU encoder was trained on
POINTS = 8192  # what Point-Bind samples; an exact count is used as is by the point loader


def _supersampled(draw_fn: Callable[[Image.Image, ImageDraw.ImageDraw, int], None], size: tuple[int, int],
                  mode: str, background: Image.Image | None = None, scale: int = 3) -> Image.Image:
    """Draw at ``scale`` x the size and shrink: PIL draws aliased shapes, and jaggies look synthetic."""
    big = (background.resize((size[0] * scale, size[1] * scale)) if background is not None
           else Image.new(mode, (size[0] * scale, size[1] * scale)))
    draw_fn(big, ImageDraw.Draw(big), scale)
    return big.resize(size, Image.Resampling.LANCZOS)


def _vertical_gradient(w: int, h: int, top: tuple[float, ...], bottom: tuple[float, ...]) -> np.ndarray:
    a = np.linspace(0.0, 1.0, h)[:, None, None]
    return (np.array(top) * (1 - a) + np.array(bottom) * a).repeat(w, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Image: a sunny landscape with hills and a tree


def make_image(path: Path) -> None:
    w, h = 448, 320
    horizon = 0.58
    sky = _vertical_gradient(w, int(h * horizon), (60, 120, 205), (200, 225, 245))
    meadow = _vertical_gradient(w, h - sky.shape[0], (120, 170, 80), (70, 130, 45))
    base = Image.fromarray(np.concatenate([sky, meadow]).astype(np.uint8))

    def draw(img: Image.Image, d: ImageDraw.ImageDraw, s: int) -> None:
        W, H = img.size
        x = np.linspace(0, W, 200)
        d.ellipse([W * .78 - 26 * s, H * .16 - 26 * s, W * .78 + 26 * s, H * .16 + 26 * s], fill=(255, 236, 140))
        for cx, cy in ((.22, .16), (.50, .10)):  # clouds: clusters of white ellipses
            for dx, dy, r in ((-30, 4, 16), (-10, -6, 22), (14, -2, 20), (34, 6, 14)):
                px, py = W * cx + dx * s, H * cy + dy * s
                d.ellipse([px - r * s * 1.4, py - r * s, px + r * s * 1.4, py + r * s], fill=(250, 250, 252))
        for y0, amp, freq, phase, colour in ((.50, .08, 2.1, .3, (110, 150, 170)),  # far hills: hazy blue
                                             (.58, .07, 3.3, 1.7, (90, 150, 70))):  # near hills: green
            y = H * (y0 - amp * (0.6 * np.sin(freq * x / W * np.pi + phase) + 0.4 * np.sin(2.7 * freq * x / W)))
            d.polygon([(0, H), *zip(x.tolist(), y.tolist(), strict=True), (W, H)], fill=colour)
        tx, ty = W * .30, H * .80  # the tree: a trunk and a crown of overlapping round clumps
        d.rectangle([tx - 7 * s, ty - 70 * s, tx + 7 * s, ty], fill=(100, 70, 40))
        for dx, dy, r, g in ((0, -110, 38, 110), (-30, -85, 30, 95), (30, -85, 30, 100), (0, -75, 32, 85)):
            d.ellipse([tx + (dx - r) * s, ty + (dy - r) * s, tx + (dx + r) * s, ty + (dy + r) * s],
                      fill=(40, g, 40))
        d.ellipse([tx - 45 * s, ty - 6 * s, tx + 45 * s, ty + 6 * s], fill=(60, 105, 40))  # its shadow

    _supersampled(draw, (w, h), "RGB", base).save(path, format="JPEG", quality=88)


# ---------------------------------------------------------------------------------------------------------------
# Video: a red ball bouncing across a room, with its shadow on the floor


def make_video(path: Path, seconds: float = 2.0, fps: int = 24) -> None:
    w, h, floor_y, radius = 320, 240, 190.0, 18.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    room = np.where((yy < 150)[..., None], _vertical_gradient(w, h, (225, 215, 195), (205, 195, 175)),
                    _vertical_gradient(w, h, (150, 105, 65), (120, 80, 45)))
    room[(yy >= 148) & (yy < 152)] = (90, 70, 50)  # skirting board where wall meets floor
    light = np.array([-0.5, -0.6, 0.62]) / np.linalg.norm([-0.5, -0.6, 0.62])
    frames = []
    for t in np.arange(int(seconds * fps)) / fps:
        bounce, phase = divmod(t / 0.55, 1.0)  # 0.55 s per bounce; each bounce 70 % of the previous height
        height = 110.0 * 0.7 ** bounce * 4 * phase * (1 - phase)
        cx, cy = 40 + 120 * t, floor_y - radius - height
        frame = room.copy()
        # the shadow: a soft ellipse that shrinks and fades as the ball rises
        spread = 1.0 + height / 110.0
        sd = ((xx - cx) / (radius * 1.3 * spread)) ** 2 + ((yy - floor_y) / (radius * 0.35 * spread)) ** 2
        frame *= 1 - (0.45 / spread) * np.clip(1.2 - sd, 0, 1)[..., None]
        # the ball: a shaded sphere (diffuse + highlight), antialiased at its edge
        dx, dy = (xx - cx) / radius, (yy - cy) / radius
        r2 = dx ** 2 + dy ** 2
        nz = np.sqrt(np.clip(1 - r2, 0, 1))
        diffuse = np.clip(dx * light[0] + dy * light[1] + nz * light[2], 0, 1)
        shade = (0.25 + 0.75 * diffuse)[..., None] * np.array([210, 30, 35]) + 255 * diffuse[..., None] ** 40
        alpha = np.clip((1 - np.sqrt(r2)) * radius + 0.5, 0, 1)[..., None]
        frames.append(np.clip(frame * (1 - alpha) + shade * alpha, 0, 255).astype(np.uint8))
    write_mp4(path, np.stack(frames), fps=fps)


# ---------------------------------------------------------------------------------------------------------------
# Audio: a two-tone doorbell ("ding-dong")


def make_audio(path: Path, seconds: float = 3.0) -> None:
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    out = np.zeros_like(t)
    for start, f0 in ((0.15, 659.25), (0.85, 523.25)):  # E5 then C5, as struck metal bars
        tt = np.clip(t - start, 0, None)
        on = t >= start
        # chime bars ring with slightly inharmonic partials; the higher ones die away sooner
        for ratio, amp, decay in ((1.0, 1.0, 1.3), (2.0, 0.45, 0.8), (3.01, 0.2, 0.5), (4.16, 0.1, 0.3)):
            out += on * amp * np.exp(-tt / decay) * np.sin(2 * np.pi * f0 * ratio * tt)
        out += on * 0.3 * np.exp(-tt / 0.004) * rng.standard_normal(t.size)  # the hammer's click
    write_wav(path, (0.8 * out / np.abs(out).max()).astype(np.float32), AUDIO_RATE)


# ---------------------------------------------------------------------------------------------------------------
# Point cloud: a chair, sampled on the surfaces of its boxes


def _box_surface(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """``n`` points uniformly on the surface of the axis-aligned box [lo, hi]."""
    size = hi - lo
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]]).repeat(2)  # ±x, ±y, ±z faces
    face = rng.choice(6, size=n, p=areas / areas.sum())
    p = lo + rng.random((n, 3)) * size
    axis = face // 2
    p[np.arange(n), axis] = np.where(face % 2 == 0, lo[axis], hi[axis])
    return p


def make_point(path: Path) -> None:
    rng = np.random.default_rng(SEED)
    # (lo, hi) in metres, y up, the backrest at -z (ShapeNet's convention: y up, objects face +z)
    legs = [((x, 0.0, z), (x + 0.04, 0.44, z + 0.04)) for x in (-0.22, 0.18) for z in (-0.22, 0.18)]
    boxes = np.array([*legs,
                      ((-0.24, 0.44, -0.24), (0.24, 0.48, 0.24)),  # seat
                      ((-0.22, 0.48, -0.24), (-0.18, 0.95, -0.20)),  # back posts
                      ((0.18, 0.48, -0.24), (0.22, 0.95, -0.20)),
                      ((-0.24, 0.70, -0.245), (0.24, 0.95, -0.205))])  # backrest panel
    lo, hi = boxes[:, 0], boxes[:, 1]
    size = hi - lo
    area = 2 * (size[:, 0] * size[:, 1] + size[:, 1] * size[:, 2] + size[:, 0] * size[:, 2])
    counts = rng.multinomial(POINTS, area / area.sum())  # points in proportion to surface: uniform density
    pts = np.concatenate([_box_surface(rng, lo[i], hi[i], c) for i, c in enumerate(counts)])
    pts -= pts.mean(axis=0)
    write_ply(path, pts / np.linalg.norm(pts, axis=1).max())  # centred, radius 1: Point-Bind's normalisation


# ---------------------------------------------------------------------------------------------------------------
# Depth: a corridor with a cabinet, ray-cast from a pinhole camera, 16-bit PNG in millimetres


def _box_hit(rx: np.ndarray, ry: np.ndarray, lo: tuple[float, ...], hi: tuple[float, ...]) -> np.ndarray:
    """Distance along z at which rays (rx, ry, 1) enter the box [lo, hi] (inf where they miss): the slab test."""
    tx = np.sort(np.stack([lo[0] / rx, hi[0] / rx]), axis=0)
    ty = np.sort(np.stack([lo[1] / ry, hi[1] / ry]), axis=0)
    near = np.maximum(np.maximum(tx[0], ty[0]), lo[2])
    far = np.minimum(np.minimum(tx[1], ty[1]), hi[2])
    return np.where(near <= far, near, np.inf)


def make_depth(path: Path) -> None:
    w, h, f = 320, 240, 260.0  # NYU Depth's intrinsics at half resolution
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    # ray directions (rx, ry, 1) through pixel centres (never 0 on an even-sized image); depth = z of the hit
    rx, ry = (u - w / 2 + 0.5) / f, -(v - h / 2 + 0.5) / f
    hits = [np.where(rx < 0, -1.1 / rx, np.inf), np.where(rx > 0, 1.1 / rx, np.inf),  # walls at x = ±1.1 m
            np.where(ry < 0, -1.5 / ry, np.inf), np.where(ry > 0, 1.0 / ry, np.inf),  # floor 1.5 m below, ceiling
            np.full_like(rx, 12.0),  # the far end
            _box_hit(rx, ry, (0.65, -1.5, 2.5), (1.1, -0.6, 3.5)),  # a cabinet against the right wall
            _box_hit(rx, ry, (-1.1, -1.5, 5.0), (-0.75, -0.9, 5.4))]  # a bin by the left wall
    depth_mm = np.min(hits, axis=0) * 1000
    Image.fromarray(np.round(depth_mm).clip(1, 65535).astype(np.uint16)).save(path, format="PNG")


# ---------------------------------------------------------------------------------------------------------------
# Thermal: a warm person on a cool night street (LLVIP-style 8-bit grayscale infrared)


def make_thermal(path: Path) -> None:
    w, h = 320, 256
    rng = np.random.default_rng(SEED)
    base = Image.fromarray(_vertical_gradient(w, h, (35,), (85,))[..., 0].astype(np.uint8), mode="L")

    def draw(img: Image.Image, d: ImageDraw.ImageDraw, s: int) -> None:
        W, H = img.size
        cx = W * 0.55
        d.rectangle([0, H * .82, W, H], fill=95)  # the road, still warm from the day
        d.rectangle([W * .12, H * .15, W * .12 + 6 * s, H * .82], fill=60)  # a lamp post
        d.ellipse([W * .12 - 8 * s, H * .13, W * .12 + 14 * s, H * .13 + 12 * s], fill=200)  # its lamp
        for x0, x1, top in ((-22, -10, .40), (10, 22, .40)):  # arms
            d.rounded_rectangle([cx + x0 * s, H * top, cx + x1 * s, H * .62], radius=6 * s, fill=175)
        d.rounded_rectangle([cx - 13 * s, H * .38, cx + 13 * s, H * .64], radius=8 * s, fill=165)  # torso (clothed)
        for x0 in (-12, 1):  # legs
            d.rounded_rectangle([cx + x0 * s, H * .62, cx + (x0 + 11) * s, H * .86], radius=5 * s, fill=160)
        d.rectangle([cx - 4 * s, H * .34, cx + 4 * s, H * .39], fill=215)  # neck
        d.ellipse([cx - 10 * s, H * .25, cx + 10 * s, H * .36], fill=235)  # head: bare skin is the warmest

    img = _supersampled(draw, (w, h), "L", base).filter(ImageFilter.GaussianBlur(1.2))  # heat blurs edges
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 1.5, (h, w))  # a microbolometer's grain
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8), mode="L").save(path, format="PNG")


# ---------------------------------------------------------------------------------------------------------------
# IMU: 10 s of walking (accelerometer m/s^2 x y z, gyroscope rad/s x y z), shape (6, 2000)


def make_imu(path: Path, seconds: float = 10.0, cadence: float = 1.8) -> None:
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * IMU_RATE)) / IMU_RATE
    step = 2 * np.pi * cadence * t  # one cycle per step
    stride = step / 2  # one cycle per left+right pair: the body sways sideways at half the step rate
    acc = np.stack([0.7 * np.sin(stride),  # x: side to side
                    1.2 * np.sin(step + 0.8),  # y: forward, braking and pushing off each step
                    9.81 + 2.2 * np.sin(step) + 0.6 * np.sin(2 * step + 0.5)])  # z: gravity + heel strikes
    gyro = np.stack([0.25 * np.sin(step + 0.3),  # pitch nods with each step
                     0.12 * np.sin(stride + 1.0),  # roll follows the sway
                     0.18 * np.sin(stride)])  # yaw: the hips turn with each stride
    data = np.concatenate([acc, gyro]) + rng.normal(0, [[0.08]] * 3 + [[0.01]] * 3, (6, t.size))
    np.save(path, data.astype(np.float32), allow_pickle=False)


# ---------------------------------------------------------------------------------------------------------------


def make_text(path: Path) -> None:
    path.write_text("A small sailing boat drifts across a calm lake at sunset, "
                    "with pine-covered hills reflected in the water.\n", encoding="utf-8")


# (name, title, file, modality, writer, question)
EXAMPLES: list[tuple[str, str, str, str, Callable[[Path], None], str]] = [
    ("landscape", "a landscape with a tree", "landscape_image.jpg", "image", make_image, "What is in this picture?"),
    ("bouncing_ball", "a bouncing ball", "bouncing_ball_video.mp4", "video", make_video,
     "What is happening in this video?"),
    ("doorbell", "a doorbell", "doorbell_audio.wav", "audio", make_audio, "What sound is this?"),
    ("chair", "a chair", "chair_point.ply", "point", make_point, "What object is this point cloud?"),
    ("corridor", "a corridor", "corridor_depth.png", "depth", make_depth, "What place does this depth map show?"),
    ("person_at_night", "a person at night", "person_thermal.png", "thermal", make_thermal,
     "What does this thermal image show?"),
    ("walking", "walking", "walking_imu.npy", "imu", make_imu,
     "What is the person wearing this motion sensor doing?"),
    ("sailing_boat", "a sailing boat", "sailing_boat_text.txt", "text", make_text, "Describe this scene in detail."),
]


def make_gallery(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, title, file, modality, writer, question in EXAMPLES:
        writer(out / file)
        entries.append({
            "name": name,
            "title": f"{title} (synthesised)",
            "files": [{"path": file, "modality": modality, "weight": 1.0}],
            "question": question,
        })
    return write_gallery(out, "Real-world subjects for the real ImageBind-LLM weights, all synthesised (no photos or "
                              "recordings) by examples/make_real_examples.py; CC0. Open questions: no expected "
                              "answers.", entries)


if __name__ == "__main__":
    raise SystemExit(main(make_gallery, REPO / "examples" / "real", __doc__.split("\n")[0]))
