"""The optimizer and learning-rate schedule, built one way for every runner (in-process and ZeRO ranks)."""

from __future__ import annotations

import torch

from dopd.common.config import Config


def make_optimizer(module: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, linear warm-up to `learner.lr` over `learner.warmup_steps`."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learner.lr, betas=tuple(cfg.learner.betas), weight_decay=cfg.learner.weight_decay)
    warm = max(cfg.learner.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched
