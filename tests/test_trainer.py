"""The in-process runner: SFT raises acceptance, OPD rounds stamp versions, resume is exact."""

from __future__ import annotations

import json

import pytest

from dopd import checkpoint
from dopd.common.load import load_config
from dopd.local import InProcess
from dopd.train import train

pytestmark = pytest.mark.heavy  # trains drafters: left out of the fast subset

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=64",
    "sft.max_new_tokens=32", "rollout.max_new_tokens=32", "eval.max_new_tokens=24", "eval.num_prompts=4",
    "learner.micro_batch_size=2", "learner.refresh_every=2", "learner.lr=3e-3",
]  # fmt: skip


def cfg_for(tmp_path, *extra):
    return load_config(None, BASE + [f"out_dir={tmp_path}"] + list(extra))


def run(cfg, tiny, resume=False):
    return train(cfg, InProcess(cfg, target=tiny, log=lambda *a: None), resume=resume)


def rows(path, event):
    return [json.loads(line) for line in open(path / "metrics.jsonl") if json.loads(line)["event"] == event]


def test_trained_drafter_beats_fresh(trained_tiny_drafter, tiny, tiny_prompts):
    from dopd.common.config import DrafterConfig
    from dopd.common.drafters import build_drafter
    from dopd.common.specdec import DecodeSettings, SpecEngine

    s = DecodeSettings(block_size=4, max_new_tokens=32, batch_size=5)
    fresh = build_drafter(DrafterConfig(), tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight)
    _, st_fresh = SpecEngine(tiny, fresh).generate(tiny_prompts, s)
    _, st_trained = SpecEngine(tiny, trained_tiny_drafter).generate(tiny_prompts, s)
    assert st_fresh.tau < 1.1 and st_trained.tau > st_fresh.tau + 0.3


def test_opd_rounds_versions_and_records(tmp_path, tiny):
    cfg = cfg_for(
        tmp_path,
        "mode=opd",
        "sft.warmup_steps=2",
        "learner.steps=4",
        "learner.eval_every=100",
        "learner.checkpoint_every=100",
    )
    summary = run(cfg, tiny)
    steps = rows(tmp_path, "step")
    assert [r["phase"] for r in steps] == ["sft", "sft", "opd", "opd", "opd", "opd"]
    # each round of refresh_every=2 steps trains records of the version right before it; versions go up
    # (version 1 = the warmed-up drafter, handed to the rollout copy before the first round)
    assert [r["policy_version"] for r in steps if r["phase"] == "opd"] == [1, 1, 2, 2]
    ro = rows(tmp_path, "rollout")
    assert [r["policy_version"] for r in ro] == [1, 2] and all(r["replay_anchors"] >= 0 for r in ro)
    seqs = [json.loads(line) for line in open(tmp_path / "opd_sequences.jsonl")]
    assert len(seqs) == 8 and {s["policy_version"] for s in seqs} == {1, 2}
    assert summary["steps"] == 6 and summary["flops"] > 0
    assert (tmp_path / "drafter" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["opd", "sft"])
def test_resume_gives_the_same_next_loss(tmp_path, tiny, mode):
    common = [f"mode={mode}", "sft.warmup_steps=2", "learner.eval_every=100"]
    a = tmp_path / "a"
    run(cfg_for(a, *common, "learner.steps=5", "learner.checkpoint_every=3"), tiny)
    straight = [r["loss"] for r in rows(a, "step")]
    # a second run that stops at step 3 (its checkpoint), then resumes to 5
    b = tmp_path / "b"
    run(
        cfg_for(b, *common, "learner.steps=3" if mode == "sft" else "learner.steps=1", "learner.checkpoint_every=3"),
        tiny,
    )
    cfg = load_config(b / "config.yaml", ["learner.steps=5"])
    assert checkpoint.find(b).step == 3
    run(cfg, tiny, resume=True)
    resumed = [r["loss"] for r in rows(b, "step")]
    assert len(straight) == (7 if mode == "opd" else 5) and len(resumed) == len(straight)
    assert resumed[:3] == pytest.approx(straight[:3], rel=1e-6, abs=1e-7)
    assert resumed[-2:] == pytest.approx(straight[-2:], rel=1e-6, abs=1e-7)


def test_a_branch_evaluates_on_its_own_schedule(tmp_path, tiny):
    """A run started from another run's checkpoint at step 3 (`resume_from`) with eval_every 2 evaluates 2 and 4
    steps after the branch point (steps 5 and 7), not at the parent's multiples of 2 (4 and 6); and an interrupted
    branch resumed from its own checkpoint keeps that schedule."""
    parent = tmp_path / "parent"
    run(cfg_for(parent, "mode=sft", "learner.steps=3", "learner.eval_every=100", "learner.checkpoint_every=100"), tiny)
    child = tmp_path / "child"
    common = [
        "mode=sft",
        "learner.eval_every=2",
        "learner.checkpoint_every=5",
        f"resume_from={parent / 'checkpoints' / 'step_0000003'}",
    ]
    run(cfg_for(child, *common, "learner.steps=5"), tiny)
    state = checkpoint.find(child).state()["run"]
    assert rows(child, "step")[0]["step"] == 4 and state["start_step"] == 3
    cfg = load_config(child / "config.yaml", ["learner.steps=7"])
    run(cfg, tiny, resume=True)
    assert checkpoint.find(child).state()["run"]["start_step"] == 3
    assert [r["step"] for r in rows(child, "eval")] == [5, 7]


def test_a_fresh_opd_optimizer_starts_adam_from_zero_moments(tmp_path, tiny):
    """`learner.opd_optimizer=fresh` (the official pipeline's separate OPD job): the first Draft-OPD step from an SFT
    checkpoint is a first AdamW step (step count 1; each weight moves by lr x g / |g| = lr), while `continue` keeps
    the warm-up's moments (step count 4, steps of another size). A checkpoint away from the phase start, or no
    checkpoint at all, is refused by name."""
    import numpy as np

    from dopd.common.config import ConfigError
    from dopd.common.errors import DopdError

    parent = tmp_path / "parent"
    run(cfg_for(parent, "mode=sft", "learner.steps=3", "learner.eval_every=100", "learner.checkpoint_every=100"), tiny)
    ckpt = parent / "checkpoints" / "step_0000003"
    before = checkpoint.Checkpoint(ckpt).weights()
    seen = {}

    def child(how: str, *extra: str) -> None:
        lr = 1e-3
        c = cfg_for(tmp_path / how, "mode=opd", "sft.warmup_steps=3", "learner.steps=1", "learner.warmup_steps=0", f"learner.opd_lr={lr}",
                    "learner.weight_decay=0", "learner.eval_every=100", f"resume_from={ckpt}", f"learner.opd_optimizer={how}", *extra)  # fmt: skip

        def on_step(backend, step):
            opt = backend.training_state()["optimizer"]["params"]
            w = backend.weights()
            moved = np.concatenate([np.abs(w[k] - before[k].float().numpy()).ravel() for k in opt]) / lr
            seen[how] = ({float(s["step"]) for s in opt.values()}, moved[moved > 0])

        train(c, InProcess(c, target=tiny, log=lambda *a: None), on_step=on_step)

    child("fresh")
    child("continue")
    steps, moved = seen["fresh"]
    assert steps == {1.0} and np.median(moved) == pytest.approx(1.0, rel=0.02)
    steps, moved = seen["continue"]
    assert steps == {4.0} and not np.median(moved) == pytest.approx(1.0, rel=0.02)
    with pytest.raises(DopdError, match="step 3, the phase starts at sft.warmup_steps=2"):
        child("fresh", "sft.warmup_steps=2")
    with pytest.raises(ConfigError, match="opd_optimizer=fresh"):
        cfg_for(tmp_path / "x", "mode=opd", "learner.opd_optimizer=fresh")
