"""The optimizer and learning-rate schedule, built one way for every runner (in-process and ZeRO ranks)."""

from __future__ import annotations

import math

import torch

from dopd.common.config import Config


def lr_factor(step: int, cfg: Config) -> float:
    """The learning rate at optimizer step `step`, as a share of `learner.lr`.

    Each phase is its own schedule, as the official [docs/recipes.md R16] pipeline runs them as two jobs (SpecForge's SFT, then the verl
    OPD run, both warm-up + cosine: docs/recipes.md R16): SFT steps [0, sft.warmup_steps),
    then Draft-OPD's learner.steps (mode=sft: one phase of learner.steps). Within a phase: linear warm-up over
    learner.warmup_steps, then (lr_schedule=cosine) a cosine down to learner.min_lr_ratio at the phase's last step.
    The Draft-OPD phase peaks at learner.opd_lr where set (a drafter fresh from SFT ends its warm-up at a tenth of
    the SFT peak; jumping back to that peak costs held-out tau before OPD's own signal shows).
    """
    c = cfg.learner
    if cfg.mode == "sft":
        start, length = 0, c.steps
    elif step < cfg.sft.warmup_steps:
        start, length = 0, cfg.sft.warmup_steps
    else:
        start, length = cfg.sft.warmup_steps, c.steps
        if c.opd_lr is not None:
            return c.opd_lr / c.lr * _shape(step - start, length, c)
    return _shape(step - start, length, c)


def _shape(s: int, length: int, c) -> float:
    """Warm-up then cosine (or constant) over one phase of `length` steps, at its step `s`."""
    warm = max(c.warmup_steps, 0)
    if warm and s < warm:
        return (s + 1) / warm
    if c.lr_schedule == "constant":
        return 1.0
    span = max(length - 1 - warm, 1)
    progress = min(max((s - warm) / span, 0.0), 1.0)
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    module: torch.nn.Module, cfg: Config
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, on the per-phase schedule of `lr_factor`."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.learner.lr, betas=tuple(cfg.learner.betas), weight_decay=cfg.learner.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def restore_schedule(sched: torch.optim.lr_scheduler.LambdaLR, groups: list[dict], saved: dict) -> None:
    """Continue a checkpoint's schedule at its position (the optimizer steps taken), with the learning rates THIS
    run's schedule gives there: a run started from another run's checkpoint (resume_from) may change learner.lr,
    opd_lr or the phase lengths, and its first step must already follow them (a resumed run gets the same rates)."""
    sched.last_epoch = int(saved["last_epoch"])
    sched._step_count = int(saved.get("_step_count", sched.last_epoch + 1))
    lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs
