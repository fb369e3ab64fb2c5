"""``python -m ibllm.train``: train, evaluate and ship the embedded default model.

    python -m ibllm.train run --out runs/toy [--smoke] [--ship assets/toy]   # the whole pipeline, resumable
    python -m ibllm.train run --out runs/lang --towers-from assets/toy      # the language stages only
    python -m ibllm.train run --out runs/c --language-from assets/toy --set 'centre_steps={"text": 300}'
    python -m ibllm.train run --out runs/s2 --stage2-from assets/toy --set s2_steps=300 --set 'centre_steps={}'
    python -m ibllm.train eval --model assets/toy [--data runs/toy/data]      # the per-modality table
    python -m ibllm.train ship --run runs/toy --to assets/toy                 # copy a finished run's model
    python -m ibllm.train finetune --data pairs.jsonl --out runs/mine         # stage 2 on your own pairs

Multi-GPU: ``torchrun --nproc_per_node N -m ibllm.train run --out runs/toy`` (see ibllm/train/common.py); the
same for ``finetune``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from ibllm.checkpoint import CheckpointError
from ibllm.factory import load_default
from ibllm.train.common import init_dist, write_json
from ibllm.train.evaluate import ensure_heldout, evaluate, markdown
from ibllm.train.finetune import LR_OFFICIAL, LR_TOY, FinetuneError, finetune
from ibllm.train.pipeline import PRESETS, Pipeline, asset_bytes, continue_stage2, reuse_model, reuse_towers, ship
from ibllm.weights import WeightsError


def _threads(n: int | None) -> int:
    """Torch threads: ``n``, else the cores other processes leave free (at least one).

    On a shared machine oversubscribed OpenMP threads spin against each other: measured here, one thread ran a
    training step 2-4x faster than two when another job already kept a core busy.
    """
    if not n:
        cores = os.cpu_count() or 1
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        n = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(n)
    return n


def cmd_run(args: argparse.Namespace) -> int:
    threads = _threads(args.threads)
    print(f"torch threads: {threads}", file=sys.stderr)
    run = PRESETS["smoke" if args.smoke else "full"]
    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(run)}:
            raise SystemExit(f"unknown run setting {key!r}")
        overrides[key] = json.loads(value)
    if args.workers is not None:
        overrides["workers"] = args.workers
    run = dataclasses.replace(run, **overrides)
    starts = (("--towers-from", args.towers_from, reuse_towers), ("--language-from", args.language_from, reuse_model),
              ("--stage2-from", args.stage2_from, continue_stage2))
    if sum(source is not None for _, source, _ in starts) > 1:
        raise SystemExit("--towers-from, --language-from and --stage2-from are ways to start a run: give one")
    for flag, source, reuse in starts:
        if source is None:
            continue
        if any((args.out / "ckpt").glob("*.safetensors")):
            raise SystemExit(f"{args.out / 'ckpt'} already has checkpoints: {flag} starts a new run")
        print(f"{flag[2:]} {source}: {reuse(args.out, source, run)}", file=sys.stderr)
    pipe = Pipeline(args.out, run)
    pipe.run_all(evaluate=not args.no_eval)
    if args.ship and pipe.dist.main:
        sizes = ship(pipe.model_dir, args.ship)
        print(f"shipped to {args.ship}: {sizes['total'] / 1e6:.1f} MB "
              f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sizes.items() if k != 'total')})")
    elif pipe.dist.main:
        sizes = asset_bytes(pipe.model_dir)
        print(f"model in {pipe.model_dir}: {sizes['total'] / 1e6:.1f} MB")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _threads(args.threads)
    if args.split == "heldout":  # another split (e.g. the validation scenes) is read as it is, never generated
        ensure_heldout(args.data, args.n or 120, seed=args.seed, workers=args.workers)
    engine = load_default(args.model)
    if not engine.info.trained:
        print(f"warning: {args.model} has no trained weights; evaluating random weights", file=sys.stderr)
    results = evaluate(engine, args.data, n=args.n, split=args.split, part=args.part)
    table = markdown(results)
    print(table)
    if args.json:
        write_json(args.json, results)
    if args.md:
        Path(args.md).write_text(table)
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    sizes = ship(Path(args.run) / "model", args.to)
    print(json.dumps(sizes, indent=1))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    _threads(args.threads)
    dist = init_dist(args.device)
    try:
        result = finetune(args.data, args.out, base=args.base, epochs=args.epochs, steps=args.steps,
                          batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, val_fraction=args.val_fraction,
                          save_every=args.save_every, eval_every=args.eval_every, seed=args.seed,
                          stop_after=args.stop_after, dist=dist, llama_dir=args.llama_dir, imagebind=args.imagebind,
                          tokenizer=args.tokenizer, assets=args.assets, dtype=args.dtype,
                          max_seq_len=args.max_seq_len)
    except (FinetuneError, CheckpointError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dist.main:
        val = result["val_loss"]
        shown = f"; validation loss {val[0][1]:.4f} -> {val[-1][1]:.4f}" if len(val) > 1 else ""
        if result["finished"]:
            print(f"adapter: {result['adapter']} ({result['steps_done']} steps{shown}); serve it with "
                  f"python app.py --adapter {result['adapter']}" + (" --llama-dir ..." if args.llama_dir else ""))
        else:
            print(f"stopped after step {result['steps_done']} of {result['settings']['steps']} (checkpoint in "
                  f"{args.out}); rerun the same command to continue")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibllm.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline (resumable: finished stages are skipped)")
    run.add_argument("--out", required=True, type=Path, help="run folder (data, checkpoints, model, report)")
    run.add_argument("--smoke", action="store_true", help="a handful of scenes and a few steps per stage")
    run.add_argument("--ship", type=Path, help="copy the finished model here (e.g. assets/toy)")
    run.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    run.add_argument("--workers", type=int, help="processes for data generation / loading")
    run.add_argument("--threads", type=int, help="torch threads (default: the cores not already busy)")
    run.add_argument("--towers-from", type=Path, metavar="MODEL_DIR",
                     help="skip the encoder stages: take the ImageBind towers of this model (e.g. assets/toy)")
    run.add_argument("--language-from", type=Path, metavar="MODEL_DIR",
                     help="skip the encoder and language stages: take every weight and the tokenizer of this "
                          "model and go on at the centring (--set centre_steps=... names the towers to move)")
    run.add_argument("--stage2-from", type=Path, metavar="MODEL_DIR",
                     help="take every weight and the tokenizer of this model and go on training its stage 2 "
                          "(--set s2_steps=N more steps; --set 'centre_steps={}' then moves no tower)")
    run.add_argument("--set", action="append", metavar="KEY=JSON",
                     help="override a RunConfig field, e.g. --set s2_steps=1000 (repeatable)")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="per-modality accuracy on held-out scenes, cache off / on")
    ev.add_argument("--model", default="assets/toy", help="a model folder as load_default reads it")
    ev.add_argument("--data", default="runs/toy/data", help="toy-world folder with heldout.jsonl (made if absent)")
    ev.add_argument("--n", type=int, help="held-out scenes to use (default: all, 120 when generating)")
    ev.add_argument("--split", default="heldout", help="scenes: heldout (default) or another manifest in --data")
    ev.add_argument("--part", default="test", choices=("train", "validation", "test"),
                    help="grammar part of the held-out-phrasing questions (validation: for choosing settings)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--workers", type=int, default=1)
    ev.add_argument("--threads", type=int)
    ev.add_argument("--json", help="write the full results here")
    ev.add_argument("--md", help="write the Markdown table here")
    ev.set_defaults(func=cmd_eval)

    sh = sub.add_parser("ship", help="copy a finished run's model/ into an assets folder")
    sh.add_argument("--run", required=True)
    sh.add_argument("--to", default="assets/toy")
    sh.set_defaults(func=cmd_ship)

    ft = sub.add_parser("finetune", help="stage 2 (LoRA, biases, norms) on your own pairs; resumable",
                        description="Fine-tune on a JSONL file of {files or <modality>: path, question, answer} "
                        "lines (paths relative to the file). Writes OUT/adapter.pth in the 7B.pth layout; a rerun "
                        "of the same command continues from OUT/checkpoint.pt.")
    ft.add_argument("--data", required=True, type=Path, help="pairs.jsonl")
    ft.add_argument("--from", dest="base", default="assets/toy",
                    help="a model folder (assets/toy), the official 7B.pth (with --llama-dir) or an earlier "
                         "fine-tune's adapter.pth (default: assets/toy)")
    ft.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, adapter.pth, report.json)")
    ft.add_argument("--llama-dir", help="Meta-format LLaMA folder, when --from is the official 7B.pth")
    ft.add_argument("--imagebind", help="imagebind_w3D.pth (default: the Hugging Face cache)")
    ft.add_argument("--tokenizer", help="tokenizer.model (default: in --llama-dir or its parent)")
    ft.add_argument("--assets", help="the toy model under an adapter.pth --from (default: assets/toy)")
    ft.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ft.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="weights while training (default float32; bfloat16 autocast on a GPU)")
    ft.add_argument("--max-seq-len", type=int, default=512, help="context of the official model")
    ft.add_argument("--epochs", type=float, default=3.0, help="passes over the training pairs (default 3)")
    ft.add_argument("--steps", type=int, help="optimiser steps (overrides --epochs)")
    ft.add_argument("--batch", type=int, default=8, help="pairs per step, over all processes (default 8)")
    ft.add_argument("--lr", type=float, help=f"peak learning rate (default {LR_TOY:g} for the toy model, "
                    f"{LR_OFFICIAL:g} for 7B: the paper's stage 2)")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--val-fraction", type=float, default=0.1, help="pairs held out for the validation loss")
    ft.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default 50)")
    ft.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (default 50)")
    ft.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps of this invocation")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--threads", type=int)
    ft.set_defaults(func=cmd_finetune)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
