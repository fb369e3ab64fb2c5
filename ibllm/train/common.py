"""What every training stage shares: the optimiser and schedule of REFERENCE.md section 6, a minimal
data-parallel layer on plain ``torch.distributed``, progress bars, and checkpoints in the official key layout.

Single process on the CPU is the default path. Launched by ``torchrun --nproc_per_node N python -m ibllm.train
run ...`` every rank takes its own slice of each batch, gradients of the trainable parameters are averaged with
one ``all_reduce`` per step, and only rank 0 writes files and draws progress bars. No wrapper class is needed,
so the same code trains any subset of the network (encoders, bind network, peft-wrapped LLaMA).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as td
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Distributed (optional)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. ``world == 1``: no process group, plain CPU/GPU training."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (every rank draws the same indices from a shared seed)."""
        return batch_indices[self.rank::self.world] if self.world > 1 else batch_indices

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                td.all_reduce(p.grad, op=td.ReduceOp.SUM)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()


SINGLE = Dist()
"""One process, CPU: the default of every training function."""


def init_dist(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return Dist(0, 1, torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule (REFERENCE.md section 6)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (ndim >= 2) only; biases, norms, gates, scales get none."""
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then a half cosine from ``lr`` down to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for group in opt.param_groups:
        group["lr"] = value


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def count(named: Iterable[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in named)


# ----------------------------------------------------------------------------------------------------------
# Batches and progress


def epoch_batches(n: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into range(n): shuffled epochs, the last partial batch of an epoch dropped
    (so every contrastive batch has the same size); with n < batch every batch is a permutation of all n."""
    batch = min(batch, n)
    done = 0
    while done < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            if done == steps:
                return
            yield order[start:start + batch]
            done += 1


def progress(total: int, desc: str, disable: bool = False, unit: str = "step") -> Any:
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=True)


@contextmanager
def timed(record: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        record[key] = record.get(key, 0.0) + time.perf_counter() - start


class LossLog:
    """Running mean of a loss for the progress bar, and the mean of the first / last tenth of the run."""

    def __init__(self, total: int):
        self.values: list[float] = []
        self.total = total

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def recent(self, k: int = 20) -> float:
        tail = self.values[-k:]
        return sum(tail) / max(1, len(tail))

    def summary(self) -> dict[str, float]:
        k = max(1, len(self.values) // 10)
        return {"loss_first": sum(self.values[:k]) / k, "loss_last": sum(self.values[-k:]) / k,
                "steps": len(self.values)}


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the official key layout, safetensors


def save_official(net: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
                  state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``net.to_official()`` as safetensors (atomically: a crash never leaves a truncated checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    official = net.to_official(state)
    tensors = {}
    for k, v in official.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class Resume:
    """Where an interrupted run continues: the next step, the optimiser's state and the losses so far."""

    step: int
    optimizer: Mapping[str, Any] | None = None
    losses: tuple[float, ...] = ()


def train_loop(desc: str, steps: int, named: list[tuple[str, nn.Parameter]], loss_fn: Any, *, lr: float,
               weight_decay: float, warmup_frac: float = 0.05, min_lr_frac: float = 0.0, clip: float = 1.0,
               dist: Dist = SINGLE, show: bool = True, resume: Resume | None = None, stop: int | None = None,
               after_step: Any = None) -> LossLog:
    """AdamW (decay on matrices only) + warm-up / half-cosine over ``steps`` calls of ``loss_fn(step)``.

    ``loss_fn`` returns the scalar loss of this rank's share of the step's batch; gradients are averaged over
    ranks before clipping and the update.

    Resuming (fine-tuning's checkpoints): ``resume`` continues a run at its step with its optimiser state and loss
    history; ``stop`` ends this call before that step (the schedule still spans ``steps``); ``after_step(step, opt,
    log)`` runs after every update and may return ``{name: text}`` to show beside the loss in the progress bar.
    """
    params = [p for _, p in named]
    opt = make_optimizer(named, lr, weight_decay)
    start = resume.step if resume else 0
    if resume and resume.optimizer:
        opt.load_state_dict(resume.optimizer)
    warmup = max(1, int(warmup_frac * steps))
    log = LossLog(steps)
    log.values = list(resume.losses) if resume else []
    end = steps if stop is None else min(steps, stop)
    bar = progress(steps, desc, disable=not (show and dist.main))
    bar.update(start)
    shown: dict[str, str] = {}
    for step in range(start, end):
        set_lr(opt, lr_at(step, steps, lr, warmup, lr * min_lr_frac))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(params)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
        log.add(value)
        bar.update()
        extra = after_step(step, opt, log) if after_step else None
        if extra:
            shown.update(extra)
        if step % 10 == 0 or step == end - 1 or extra:
            bar.set_postfix(loss=f"{log.recent():.4f}", **shown)
    bar.close()
    return log
