"""The optimizer and learning-rate schedule, built one way for every runner (in-process and ZeRO ranks)."""

from __future__ import annotations

import math

import torch

from dopd.common.config import Config


def lr_factor(step: int, warm: int, total: int, schedule: str) -> float:
    """The learning rate at optimizer step `step` as a fraction of `learner.lr`: linear warm-up over `warm` steps,
    then constant, or cosine to 0 at `total` (the official recipes' schedule)."""
    f = min(1.0, (step + 1) / warm) if warm else 1.0
    if schedule == "cosine" and step >= warm and total > warm:
        f *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
    return f


def make_optimizer(module: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, linear warm-up to `learner.lr` over `learner.warmup_steps`, then
    `learner.lr_schedule` over the whole run (a run resumed from another's checkpoint continues the step count)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learner.lr, betas=tuple(cfg.learner.betas), weight_decay=cfg.learner.weight_decay)
    warm = max(cfg.learner.warmup_steps, 0)
    total = cfg.learner.steps + (cfg.sft.warmup_steps if cfg.mode == "opd" else 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warm, total, cfg.learner.lr_schedule))
    return opt, sched
