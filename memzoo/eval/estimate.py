"""How long a ``memzoo-bench`` sweep will take, before it starts: run count and an ETA from a measured warm-up.

Each distinct (data, model, width) cell is built once and timed for one optimizer step after a first,
untimed one, on a batch of its longest train segment; a run costs that step time times its step count
(epochs x batches, capped by ``max_steps``) plus one forward pass over the test sets per epoch (a third
of a training step per batch).  Early stopping is ignored, so the estimate is an upper bound.  Cells
past the warm-up budget are scaled from the measured ones by tokens x width.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from .config import BenchConfig, BenchTrainConfig, DataSpec, ModelSpec
from .harness import steps_per_epoch, train_step, trainable
from .tasks import make_task

__all__ = ["estimate_sweep", "format_seconds", "HOUR"]

HOUR = 3600.0


def format_seconds(s: float) -> str:
    """``s`` as ``42 s``, ``17 min``, ``3.5 h`` or ``6 days``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * HOUR:
        return f"{s / HOUR:.1f} h"
    return f"{s / (24 * HOUR):.0f} days"


def _batch(data: DataSpec, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    # ``rows`` examples of each train segment; the longest one stands for all (an upper bound).
    samples = [make_task(dataclasses.replace(c, num_examples=rows), seed=0) for c in data.train]
    longest = max(samples, key=lambda d: d.inputs.shape[1])
    return longest.inputs, longest.labels


def time_step(spec: ModelSpec, d_model: int, data: DataSpec, train: BenchTrainConfig, device: torch.device,
              max_rows: int = 16) -> float:
    """Seconds of one training step of ``spec`` at width ``d_model`` on a batch of ``data`` (after a first step).

    A batch of more than ``max_rows`` rows is timed at ``max_rows`` and scaled linearly (small batches cost a
    little more per row, so the scaled time errs high).
    """
    batch_size = data.batch_size or train.batch_size
    rows = min(batch_size, max_rows)
    x, y = (t.to(device) for t in _batch(data, rows))
    torch.manual_seed(0)
    model = spec.build(data.vocab_size, d_model).to(device)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    train_step(model, opt, params, x, y, train, device)
    t0 = time.perf_counter()
    # train_step ends with loss.item(), which waits for the device.
    train_step(model, opt, params, x, y, train, device)
    return (time.perf_counter() - t0) * batch_size / rows


def _shape(data: DataSpec, train: BenchTrainConfig) -> tuple[int, float]:
    """Tokens of a training batch, and the test examples of one epoch in units of training batches."""
    length = max(make_task(dataclasses.replace(c, num_examples=1), seed=0).inputs.shape[1] for c in data.train)
    batch = data.batch_size or train.batch_size
    test = sum(c.num_examples * make_task(dataclasses.replace(c, num_examples=1), seed=0).inputs.shape[1]
               for c in data.test)
    return batch * length, test / (batch * length)


def estimate_sweep(cfg: BenchConfig, device: str | torch.device = "cpu", *, budget_s: float = 20.0,
                   step_timer: Callable[..., float] = time_step) -> dict[str, float]:
    """Run count, step count and estimated seconds of ``cfg`` on ``device``.

    Returns:
        ``runs``, ``steps`` (all runs, early stopping ignored), ``seconds`` (upper bound),
        ``measured`` (cells timed) and ``cells`` (distinct data x model x width).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    repeats = len(cfg.lrs) * len(cfg.seeds)
    shapes = [_shape(data, cfg.train) for data in cfg.data]
    cells = [(di, mi, d) for di in range(len(cfg.data)) for mi in range(len(cfg.models)) for d in cfg.d_models]
    step_s: dict[tuple[int, int, int], float] = {}
    for di, mi, d in cells:
        if step_s and time.perf_counter() - t0 > budget_s:
            break
        step_s[di, mi, d] = step_timer(cfg.models[mi], d, cfg.data[di], cfg.train, device)
    # Seconds per (token x width), for the cells past the budget.
    unit = sum(s / (shapes[di][0] * d) for (di, _, d), s in step_s.items()) / len(step_s)
    steps = seconds = 0.0
    for di, mi, d in cells:
        per_epoch = steps_per_epoch(cfg.data[di], cfg.train)
        total = per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        s = step_s.get((di, mi, d), unit * shapes[di][0] * d)
        steps += total * repeats
        seconds += repeats * (total * s + math.ceil(total / per_epoch) * shapes[di][1] * s / 3)
    return {"runs": len(cells) * repeats, "steps": int(steps), "seconds": seconds, "measured": len(step_s),
            "cells": len(cells)}
