"""Every named recipe trains end to end in process (tiny target, a few steps): the loss stays finite and every
step row carries the diagnostics (per-stream loss, gradient norm of head vs body, acceptance per draft position,
the clamp's silenced share, the replay-mismatch split) where the recipe defines them."""

from __future__ import annotations

import json
import math

import pytest

from dopd.common.load import load_config
from dopd.local import InProcess
from dopd.train import train

pytestmark = (
    pytest.mark.heavy
)  # trains drafters (and decodes the tiny target's texts once): left out of the fast subset

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=16",
    "sft.max_new_tokens=32", "rollout.max_new_tokens=32", "eval.max_new_tokens=24", "eval.num_prompts=4",
    "learner.micro_batch_size=2", "learner.refresh_every=2", "learner.lr=3e-3", "mode=opd", "sft.warmup_steps=2",
    "learner.steps=2", "learner.eval_every=100", "learner.checkpoint_every=100",
]  # fmt: skip

COMMON = ("grad_norm_head", "grad_norm_body", "alpha_trained")
REPLAY = ("replay_kl_matched", "replay_n_matched", "replay_kl_first_rejected")
EXPECT = {
    "official-2605": ([], COMMON + REPLAY + ("acc_div", "rej_div", "acc_silenced", "rej_silenced")),
    "official-tv": ([], COMMON + REPLAY + ("tv_div", "tv_distance", "tv_expected_accept", "tv_positions")),
    "official-eagle3": (["drafter.draft_vocab_size=64"], COMMON + ("acc_div",)),
    "dopd-2511": (["drafter.draft_vocab_size=64"], COMMON + REPLAY + ("acc_silenced", "rej_silenced")),
}


@pytest.mark.parametrize("recipe", list(EXPECT))
def test_recipe_trains_with_diagnostics(tmp_path, tiny, recipe):
    extra, fields = EXPECT[recipe]
    cfg = load_config(None, BASE + [f"out_dir={tmp_path}", f"loss.recipe={recipe}", *extra])
    lines: list[str] = []
    train(cfg, InProcess(cfg, target=tiny, log=lambda *a: lines.append(" ".join(map(str, a)))))
    said = [x for x in lines if x.startswith(f"dopd: loss.recipe={recipe}")]
    assert len(said) == 1 and said[0].endswith("no deviation"), said
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if r["event"] == "step" and r["phase"] == "opd"]
    assert len(steps) == 2
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        missing = [f for f in fields if f not in r]
        assert not missing, f"{recipe}: step row lacks {missing}"
        assert len(r["alpha_trained"]) == cfg.rollout.block_size
        if recipe == "dopd-2511":  # its own head over a reduced vocabulary is trained
            assert r["grad_norm_head"] > 0
        elif recipe != "official-eagle3":  # the frozen target head: every gradient is in the body
            assert r["grad_norm_head"] == 0 and r["grad_norm_body"] > 0
    assert (tmp_path / "config.yaml").read_text().count(f"recipe: {recipe}") == 1
