"""Write the toy-world example gallery into examples/toy/ (files + gallery.json).

    python examples/make_examples.py [--out examples/toy]

Every example is a fixed Scene rendered by ibllm.train.toyworld, so rerunning rewrites identical bytes. The
seeds are above 2**31, outside the range ``sample_scene`` draws from, so no example file is ever a training
file (the latent combination may still be a training one: gallery.json says which split it belongs to).
gallery.json lists, per example: the files and their modality, the question, the reference answer and the
words a correct answer must contain (case-insensitive substrings); a two-turn example also has a ``followup``
(question, answer, expect) asked after the first answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout, without installing the package
    sys.path.insert(0, str(REPO))

from ibllm.train import toyworld as tw  # noqa: E402
from ibllm.train.toyworld import Scene  # noqa: E402

SEED0 = 2**31 + 1000

# (name, scene latents (shape, colour, size, position, count, motion), modalities, question latent, question)
EXAMPLES: list[tuple[str, tuple, tuple[str, ...], str, str]] = [
    ("red_cube", ("cube", "red", "large", "left", 1, "still"), ("image",), "colour", "What colour is it?"),
    ("green_spheres", ("sphere", "green", "small", "centre", 2, "still"), ("image",), "shape",
     "What shape is it?"),
    ("cone_moving_left", ("cone", "yellow", "large", "centre", 1, "left"), ("video",), "motion",
     "Which way does it move?"),
    ("spinning_torus", ("torus", "blue", "large", "right", 1, "spinning"), ("video",), "motion",
     "How is it moving?"),
    ("bell_torus", ("torus", "white", "large", "centre", 1, "still"), ("audio",), "shape", "What shape is it?"),
    ("knocking_cube", ("cube", "orange", "small", "centre", 1, "still"), ("audio",), "shape",
     "What shape is it?"),
    ("pyramid", ("pyramid", "purple", "large", "centre", 1, "still"), ("point",), "shape",
     "What shape is it?"),
    ("cylinder", ("cylinder", "red", "small", "centre", 1, "still"), ("point",), "shape",
     "What shape is it?"),
    ("blue_cube", ("cube", "blue", "large", "right", 1, "still"), ("depth",), "shape", "What shape is it?"),
    ("white_cone", ("cone", "white", "large", "centre", 1, "still"), ("thermal",), "shape",
     "What shape is it?"),
    ("going_up", ("sphere", "red", "small", "centre", 1, "up"), ("imu",), "motion", "Which way does it move?"),
    ("spinning_sensor", ("cube", "green", "small", "centre", 1, "spinning"), ("imu",), "motion",
     "How is it moving?"),
    ("green_cylinder", ("cylinder", "green", "small", "right", 1, "down"), ("text",), "colour", "What colour is it?"),
    # Mixes: the inputs' embeddings are fused before the language model sees them.
    ("purple_sphere", ("sphere", "purple", "large", "centre", 1, "still"), ("image", "audio"), "shape",
     "What shape is it?"),
    ("yellow_torus", ("torus", "yellow", "large", "left", 1, "still"), ("point", "text"), "colour",
     "What colour is it?"),
    ("orange_cube", ("cube", "orange", "large", "centre", 1, "right"), ("video", "imu"), "motion",
     "Which way does it move?"),
]


# Two-turn examples: after the example's question, a follow-up about another latent of the same inputs (one the
# inputs may not carry: then the right answer says it cannot tell). (latent, question) by example name.
FOLLOWUPS: dict[str, tuple[str, str]] = {
    "red_cube": ("shape", "And its shape?"),
    "cone_moving_left": ("colour", "What colour is it?"),
    "bell_torus": ("colour", "And its colour?"),
    "pyramid": ("motion", "Is it moving?"),
}


def _followup(scene: Scene, modalities: tuple[str, ...], latent: str, question: str) -> dict:
    carried = tuple(n for n in tw.LATENTS if any(n in tw.CARRIES[m] for m in modalities))
    answer = tw.answer_for(scene, latent, carried, question)
    expect = tw.expected_words(scene, latent, carried) if latent in carried else ["cannot tell"]
    return {"question": question, "answer": answer, "expect": expect, "latent": latent}


def make_gallery(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    written: set[str] = set()
    for k, (name, latents, modalities, latent, question) in enumerate(EXAMPLES):
        scene = Scene(*latents, seed=SEED0 + k)
        files = tw.write_scene(scene, out, modalities, stem=name)
        written.update(p.name for p in files.values())
        carried = set().union(*(tw.CARRIES[m] for m in modalities))
        if latent not in carried:
            raise ValueError(f"{name}: {modalities} do not carry {latent}")
        entries.append({
            "name": name,
            "files": [{"path": p.name, "modality": m, "weight": 1.0} for m, p in files.items()],
            "question": question,
            "answer": tw.answer_for(scene, latent, "text", question),
            "expect": tw.expected_words(scene, latent, "text"),
            "latent": latent,
            "scene": scene.to_dict(),
            "split": scene.split,
            **({"followup": _followup(scene, modalities, *FOLLOWUPS[name])} if name in FOLLOWUPS else {}),
        })
    # Drop files of examples that no longer exist, so the folder is exactly the gallery.
    for path in out.iterdir():
        if path.is_file() and path.name != "gallery.json" and path.name not in written:
            path.unlink()
    return write_gallery(out, "Toy-world examples for the embedded default model; made by examples/make_examples.py. "
                              "A correct answer contains every word in 'expect' (case-insensitive).", entries)


def write_gallery(out: Path, about: str, entries: list[dict]) -> dict:
    """``out/gallery.json``: the format ``ibllm.ui.gallery.load_gallery`` reads (also used by make_real_examples)."""
    gallery = {"about": about, "examples": entries}
    (out / "gallery.json").write_text(json.dumps(gallery, indent=1) + "\n")
    return gallery


def main(make: Callable[[Path], dict] | None = None, default_out: Path = REPO / "examples" / "toy",
         description: str | None = None) -> int:
    """Command line of a gallery script: write the gallery into --out and say what was written."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    gallery = (make or make_gallery)(args.out)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{len(gallery['examples'])} examples, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
