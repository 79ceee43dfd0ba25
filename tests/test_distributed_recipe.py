"""The distributed runner trains the same recipe as the in-process one: a reduced draft vocabulary, DFlash's
official blocks + rejected stream, re-segmented rollouts and simulated held-out tau."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import heldout_of_saved

from dopd.common.load import load_config
from dopd.driver import RayFleet
from dopd.train import train

pytestmark = pytest.mark.ray

BASE = [
    "model.target=tiny-random-llama", "model.dtype=float32", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
    "sft.num_prompts=16", "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.batch_size=2",
    "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2", "learner.refresh_every=2",
    "learner.lr=3e-3", "learner.zero_stage=2", "cluster.actors=1", "cluster.learners=2", "cluster.actor_num_cpus=1",
    "metrics.port=0", "learner.eval_every=100", "learner.checkpoint_every=100", "drafter.kind=dflash",
    "drafter.draft_vocab_size=48", "sft.warmup_steps=2", "learner.steps=4",
]  # fmt: skip


def test_reduced_draft_vocabulary_trains_in_the_distributed_runner(ray_session, tmp_path):
    from dopd.common.drafters import load_drafter
    from dopd.common.models import load_frozen_io, load_target
    from dopd.local import InProcess

    cfg = load_config(None, BASE + ["runner=ray", f"out_dir={tmp_path / 'ray'}"])
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
    assert summary["steps"] == 6 and summary["records_trained_twice"] == 0
    fresh = heldout_of_saved(cfg, cfg.out_dir)  # the saved drafter, measured again in this process
    assert (fresh["tau"], fresh["alpha"]) == pytest.approx((summary["tau"], summary["alpha"]), abs=1e-9)
    info, embed, head, _ = load_frozen_io("tiny-random-llama")
    d = load_drafter(tmp_path / "ray" / "drafter", info, embed, head)
    assert d.draft_vocab == 48 and d.lm_head.weight.shape[0] == 48
    # the vocabulary is the one the in-process runner picks from the same SFT data, not the placeholder 0..47
    local = InProcess(
        load_config(None, BASE + ["cluster.learners=1", f"out_dir={tmp_path / 'local'}"]),
        target=load_target("tiny-random-llama"),
        log=lambda *a: None,
    )
    local.sft_data(needed=False)  # the SFT data a fresh reduced-vocabulary drafter picks its vocabulary from
    assert torch.equal(d.draft_ids, local.drafter.draft_ids) and not torch.equal(d.draft_ids, torch.arange(48))
    rows = [json.loads(x) for x in open(tmp_path / "ray" / "metrics.jsonl")]
    evals = [r for r in rows if r["event"] == "eval"]
    assert evals and all(r["simulated"] for r in evals)  # held-out tau from the cached greedy text (T = 0)
    opd = [r for r in rows if r["event"] == "step" and r["phase"] == "opd"]
    assert len(opd) == 4 and all(math.isfinite(r["loss"]) for r in opd)
