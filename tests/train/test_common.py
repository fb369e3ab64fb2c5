"""Training building blocks: the schedule and optimiser of REFERENCE.md section 6, batches, answer-only targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ibllm.train.common import epoch_batches, lr_at, make_optimizer, param_groups, train_loop
from ibllm.train.language import IGNORE, Example, collate


def test_warmup_then_half_cosine() -> None:
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # then never increases
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)
    assert lr_at(100, 100, 1.0, 10, min_lr=0.1) == pytest.approx(0.1)


def test_weight_decay_on_matrices_only_and_betas() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = param_groups(model.named_parameters(), 0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2] and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    opt = make_optimizer(model.named_parameters(), 1e-3, 0.1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    assert sum(len(g["params"]) for g in param_groups(model.named_parameters(), 0.1)) == 3


def test_epoch_batches_cover_each_epoch_once() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = list(epoch_batches(10, 4, 6, gen))
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    first_epoch = torch.cat(batches[:2])
    assert len(set(first_epoch.tolist())) == 8  # two full batches of an epoch of 10; the last 2 are dropped
    assert [len(b) for b in epoch_batches(3, 8, 2, gen)] == [3, 3]


def test_train_loop_fits_a_line() -> None:
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    x = torch.linspace(-1, 1, 32)[:, None]
    y = 3 * x + 1
    log = train_loop("fit", 200, list(model.named_parameters()), lambda step: ((model(x) - y) ** 2).mean(),
                     lr=0.1, weight_decay=0.0, show=False)
    summary = log.summary()
    assert summary["loss_last"] < 1e-3 < summary["loss_first"]


def test_train_loop_refuses_non_finite_loss() -> None:
    w = nn.Parameter(torch.ones(1))
    with pytest.raises(FloatingPointError):
        train_loop("nan", 3, [("w", w)], lambda step: w.sum() * float("nan"), lr=0.1, weight_decay=0.0,
                   show=False)


def test_collate_puts_the_loss_on_the_answer_only() -> None:
    examples = [Example([1, 10, 11], [20, 21, 2], 0), Example([1, 10], [22, 2], -1)]
    tokens, targets = collate(examples, pad_id=2)
    assert tokens.tolist() == [[1, 10, 11, 20, 21, 2], [1, 10, 22, 2, 2, 2]]
    # position t predicts token t+1; prompt tokens and padding carry no loss
    assert targets.tolist() == [[IGNORE, IGNORE, 20, 21, 2, IGNORE], [IGNORE, 22, 2, IGNORE, IGNORE, IGNORE]]
    _, lm_targets = collate(examples, pad_id=2, loss_on_prompt=True)
    assert lm_targets[0].tolist() == [10, 11, 20, 21, 2, IGNORE]


