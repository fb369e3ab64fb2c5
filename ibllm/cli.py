"""``python -m ibllm COMMAND``: generate, batch, doctor, parity, merge-chinese, build-cache.

The weights options (``add_weights_arguments``) are the ones ``app.py`` takes too: none serve the embedded
default model. Generation and visual-cache options default to ``None``, meaning "the loaded model's own
settings" (``ModelConfig.generation`` / ``visual_cache``), so every front end serves the same defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ibllm.batch import run_batch
from ibllm.cache import VisualCache
from ibllm.config import PictureConfig
from ibllm.doctor import doctor
from ibllm.factory import create_engine
from ibllm.imagine import PictureError
from ibllm.kinds import KINDS, MEDIA_KINDS
from ibllm.media.errors import MediaError
from ibllm.types import Attachment
from ibllm.weights import merge_chinese_delta


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the weights (also used by app.py)."""
    g = parser.add_argument_group("weights (none: the embedded default model)")
    g.add_argument("--llama-dir", help="Meta-format LLaMA-7B folder (params.json, consolidated.00.pth)")
    g.add_argument("--tokenizer", help="tokenizer.model (default: in --llama-dir or its parent)")
    g.add_argument("--adapter", help="ImageBind-LLM 7B.pth (default: the Hugging Face cache), or a fine-tune's "
                   "adapter.pth (python -m ibllm.train finetune; without --llama-dir: over the toy model)")
    g.add_argument("--imagebind", help="imagebind_w3D.pth (default: the Hugging Face cache)")
    g.add_argument("--knn-index", help="knn.index or a cache folder from build-cache (default: the HF cache)")
    g.add_argument("--assets", help="folder of a toy-format model (default: assets/toy)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: the fastest that fits (float16 on a GPU; on a CPU float32, else bfloat16 where "
                        "the CPU has bfloat16 units, else float16)")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantised linear layers (torchao), the rest in bfloat16. int8: LLaMA's, the bind "
                        "network's and the encoders' (the released model in ~9 GB); int4: LLaMA's (~7 GB; a GPU of "
                        "compute capability 8.0+)")
    g.add_argument("--max-seq-len", type=int, default=512, help="context length of the official model")
    g.add_argument("--unclip", metavar="DIR_OR_REPO",
                   help="Stable unCLIP pipeline for picture answers: a diffusers folder or a hub repo id, loaded on "
                        "first use (env IBLLM_UNCLIP; default stabilityai/stable-diffusion-2-1-unclip)")
    g = parser.add_argument_group("serving")
    g.add_argument("--max-batch", type=int, metavar="N",
                   help="answers decoded together; more wait in line (env IBLLM_MAX_BATCH; default 4)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the batched decode step, warmed up at start-up (env IBLLM_COMPILE=1/0; "
                        "default: on CUDA, off on CPU)")


WEIGHTS_OPTIONS = ("llama_dir", "tokenizer", "adapter", "imagebind", "knn_index", "assets", "device", "dtype",
                   "quantize", "max_seq_len", "max_batch", "compile", "unclip")


def weights_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The weights and serving options as ``create_engine`` keyword arguments."""
    return {name: getattr(args, name) for name in WEIGHTS_OPTIONS}


def show_logs() -> None:
    """ibllm's own log lines (compiled step, fallbacks) on stderr, without turning on other libraries' logs."""
    logger = logging.getLogger("ibllm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(message)s]"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def overridden(config: Any, **values: Any) -> Any:
    """A copy of a frozen settings dataclass with the options that were given (not None) replaced."""
    return dataclasses.replace(config, **{k: v for k, v in values.items() if v is not None})


def parse_weighted(value: str) -> tuple[str, float]:
    """``path`` or ``path@weight``."""
    path, sep, weight = value.rpartition("@")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


def _cmd_generate(args: argparse.Namespace) -> int:
    attachments = []
    for modality in MEDIA_KINDS:
        for value in getattr(args, modality) or []:
            path, weight = parse_weighted(value)
            attachments.append(Attachment(path, modality, weight))
    model = create_engine(**weights_kwargs(args))
    print(f"[{model.info.name}: {model.info.weights}; {model.info.device} {model.info.dtype}]", file=sys.stderr)
    generation = overridden(model.cfg.generation, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    visual_cache = overridden(model.cfg.visual_cache, enabled=False if args.no_cache else None,
                              top_k=args.cache_size, temperature=args.cache_t, weight=args.cache_weight)
    if args.image_only and not args.image_out:
        print("error: --image-only needs --image-out FILE", file=sys.stderr)
        return 2
    if args.image_out:
        picture = overridden(PictureConfig(), steps=args.picture_steps, guidance=args.picture_guidance,
                             seed=args.picture_seed, noise_level=args.picture_noise_level)
        status = model.picture_status()
        if not status.available:  # before the text answer: say at once that no picture will come
            print(f"error: no picture: {status.note}", file=sys.stderr)
            return 2
    if args.image_only:
        return _write_picture(model, args, attachments, visual_cache, picture)
    try:
        for event in model.chat(args.question, attachments=attachments, visual_cache=visual_cache,
                                generation=generation):
            sys.stdout.write(event.delta)
            sys.stdout.flush()
    except MediaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    for note in event.notes:
        print(f"[{note}]", file=sys.stderr)
    if event.neighbours:
        shown = ", ".join(f"#{n.index} {n.similarity:.2f}" + (f" {n.caption!r}" if n.caption else "")
                          for n in event.neighbours[:3])
        print(f"[cache: {shown}]", file=sys.stderr)
    print(f"[{event.timings.summary()}]", file=sys.stderr)
    if args.image_out:
        return _write_picture(model, args, attachments, visual_cache, picture)
    return 0


def _write_picture(model: Any, args: argparse.Namespace, attachments: list[Attachment], visual_cache: Any,
                   picture: PictureConfig) -> int:
    """Draw the answer as a picture into ``args.image_out``, with progress on stderr."""
    try:
        for event in model.imagine(args.question, attachments=attachments, visual_cache=visual_cache,
                                   picture=picture):
            if event.loading:
                print("[loading the unCLIP pipeline (first picture)…]", file=sys.stderr)
            elif event.step and not event.done:
                print(f"\r[picture: step {event.step}/{event.steps}]", end="", file=sys.stderr, flush=True)
    except (MediaError, PictureError, ValueError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    event.image.save(args.image_out)
    print(f"\n[picture: {args.image_out} ({event.image.width}×{event.image.height}, seed {event.seed}); "
          f"{event.timings.summary()}]", file=sys.stderr)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    if not Path(args.requests).is_file():
        print(f"error: {args.requests}: no such requests file", file=sys.stderr)
        return 2
    model = create_engine(**weights_kwargs(args))
    print(f"[{model.info.name}: {model.info.weights}; {model.info.device} {model.info.dtype}; "
          f"{model.scheduler.slots} decode slots]", file=sys.stderr)
    try:
        report = run_batch(model, args.requests, args.out, retry_failed=args.retry_failed)
    finally:
        model.close()
    print(f"[{report.answered} answered, {report.failed} failed, {report.skipped} skipped (already in {args.out})]",
          file=sys.stderr)
    return 1 if report.failed else 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    return doctor(llama_dir=args.llama_dir, adapter=args.adapter, imagebind=args.imagebind,
                  knn_index=args.knn_index, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                  quantize=args.quantize, max_seq_len=args.max_seq_len)


def _cmd_parity(args: argparse.Namespace) -> int:
    # MKL picks its kernels by CPU (AVX-512 on Intel, another path on AMD), and FFT rounding differs between them;
    # the log-mel of near-silent bins amplifies that to 5e-4 (measured on the audio row of parity-a, made on an
    # AMD EPYC; 1.8e-7 with the pinned path). Its conditional numerical reproducibility mode makes the comparison
    # independent of the CPU. It must be set before torch first calls MKL, so before ibllm.parity is imported.
    os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
    from ibllm import parity  # imported after the line above; importing calls no MKL routine, running does

    results = parity.run(args.dir, only=args.only)
    print(parity.report(results))
    return 0 if results and all(r.ok for r in results) else 1


def _cmd_merge_chinese(args: argparse.Namespace) -> int:
    out = merge_chinese_delta(args.llama_dir, args.delta_dir, args.out)
    print(f"wrote 7B_chinese to {out}")
    return 0


def _cmd_build_cache(args: argparse.Namespace) -> int:
    if args.from_index:
        cache = VisualCache.load(args.from_index)
        print(f"read {len(cache)} vectors of {cache.dim}-d; building HNSW (once; this can take a while)")
        cache.to_hnsw().save(args.out)
    else:
        model = create_engine(**weights_kwargs(args))
        images = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in KINDS["image"].extensions)
        if not images:
            print(f"no images under {args.images}", file=sys.stderr)
            return 1
        embeddings, captions = [], []
        for path in images:
            embeddings.append(torch.nn.functional.normalize(model.embed(Attachment(str(path), "image")), dim=-1))
            caption = path.with_suffix(".txt")
            captions.append(caption.read_text().strip() if caption.is_file() else path.stem)
        VisualCache.build(torch.stack(embeddings), ids=[str(p) for p in images], captions=captions,
                          thumbnails=[str(p) for p in images]).save(args.out)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ibllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer a question about files, streamed to stdout")
    p.add_argument("question")
    for modality in MEDIA_KINDS:
        p.add_argument(f"--{modality}", action="append", metavar="FILE[@WEIGHT]",
                       help=f"{KINDS[modality].label} input (repeatable; @WEIGHT sets its mixing weight, default 1)")
    g = p.add_argument_group("generation and visual cache (default: the loaded model's own settings)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--no-cache", action="store_true", help="do not mix in the visual cache")
    g.add_argument("--cache-size", type=int, help="neighbours retrieved (top-k)")
    g.add_argument("--cache-t", type=float, help="softmax temperature over the neighbours' similarities")
    g.add_argument("--cache-weight", type=float, help="mix weight of the retrieved feature")
    g = p.add_argument_group("picture answer (Stable unCLIP; needs requirements-image.txt and the official encoders)")
    g.add_argument("--image-out", metavar="FILE", help="also draw the answer as a picture into FILE (e.g. out.png)")
    g.add_argument("--image-only", action="store_true", help="draw the picture only, no text answer")
    g.add_argument("--picture-steps", type=int, help=f"denoising steps (default {PictureConfig.steps})")
    g.add_argument("--picture-guidance", type=float, help=f"guidance scale (default {PictureConfig.guidance})")
    g.add_argument("--picture-seed", type=int, help="seed (default: a random one, printed)")
    g.add_argument("--picture-noise-level", type=int, help="noise added to the embedding, 0-999 (default 0)")
    add_weights_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("batch", help="answer a JSONL file of requests (resumable); see ibllm/batch.py for the format",
                       description="Answer every line of REQUESTS (JSON: id, question, inputs, history, generation, "
                                   "visual_cache) into --out, several at once through the engine's batch. Resumable: "
                                   "ids already in --out are skipped. A failed line is recorded with its error.")
    p.add_argument("requests", help="JSONL file, one request per line (relative paths: from its folder)")
    p.add_argument("--out", required=True, help="JSONL answers file (appended to)")
    p.add_argument("--retry-failed", action="store_true", help="answer again the ids recorded as failed")
    add_weights_arguments(p)
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("doctor", help="check an official weights setup (files, shapes, base LLaMA version)")
    add_weights_arguments(p)
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("parity", help="compare against a reference fixture (e.g. ../shared/fixtures/parity-a)")
    p.add_argument("dir", help="fixture directory with config.json, model.safetensors, inputs, expected outputs")
    p.add_argument("--only", choices=["encoders", "preprocessing", "language", "end-to-end"],
                   help="run one check group")
    p.set_defaults(func=_cmd_parity)

    p = sub.add_parser("merge-chinese", help="build 7B_chinese = LLaMA-7B + Open-Chinese-LLaMA delta (fp16)")
    p.add_argument("--llama-dir", required=True)
    p.add_argument("--delta-dir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_merge_chinese)

    p = sub.add_parser("build-cache", help="build a visual cache: HNSW from knn.index, or from a folder of images")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-index", help="an existing faiss index (e.g. the official knn.index)")
    src.add_argument("--images", help="a folder of images (captions from same-named .txt files)")
    p.add_argument("--out", required=True, help="output folder")
    add_weights_arguments(p)
    p.set_defaults(func=_cmd_build_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_logs()
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        # Weights/config problems carry messages written for people: show them without a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
