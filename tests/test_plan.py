"""The resource plan (dopd/plan.py): its numbers, the refusal with the largest --actors that fits, the CLI's
--dry-run and --actors 0, and the plan printed for `--actors 16 --learners 4` on SmolLM2 from its files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dopd import plan as plan_mod
from dopd.cli import app
from dopd.common.errors import DopdError
from dopd.common.load import load_config
from dopd.plan import PROCESS_BASE_BYTES, GiB, Machine, MiB, PlanRefused, Sizes, check, make_plan, safetensors_params

SIZES = Sizes(
    target_params=100_000_000, target_dtype="float32", dtype_note="test", kv_bytes_per_token=1000,
    drafter_trainable=1_000_000, drafter_frozen=10_000_000,
)  # fmt: skip
TWO_CORES = Machine(cpus=2, memory_total=23 * GiB, memory_available=20 * GiB)


def ray_cfg(actors: int, learners: int, *extra: str):
    return load_config(
        None, ["runner=ray", f"cluster.actors={actors}", f"cluster.learners={learners}", *extra]
    )  # fmt: skip


def test_plan_numbers_per_actor_and_rank():
    cfg = ray_cfg(4, 2, "learner.zero_stage=2", "rollout.batch_size=4")
    p = make_plan(cfg, TWO_CORES, SIZES)
    ctx = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    ctx += cfg.eval_block_size + 1
    assert p.actor_target_bytes == 400_000_000  # 100M params x 4 bytes
    assert p.actor_kv_bytes == 4 * ctx * 1000
    assert p.actor_bytes == 400_000_000 + 4 * ctx * 1000 + 4_000_000 + PROCESS_BASE_BYTES
    # ZeRO-2 over 2 ranks: gradients and AdamW states halved, fp32 weights whole; frozen matrices fp32
    assert p.learner_optimizer_bytes == 1_000_000 * 4 // 2 + 1_000_000 * 12 // 2
    assert p.learner_drafter_bytes == 1_000_000 * 4 + 10_000_000 * 4
    z3 = make_plan(ray_cfg(4, 2, "learner.zero_stage=3"), TWO_CORES, SIZES)
    assert z3.learner_drafter_bytes == 1_000_000 * 4 // 2 + 10_000_000 * 4
    z0 = make_plan(ray_cfg(4, 2, "learner.zero_stage=0"), TWO_CORES, SIZES)
    assert z0.learner_optimizer_bytes == 1_000_000 * 16
    assert p.need_bytes == 4 * p.actor_bytes + 2 * p.learner_bytes + p.fixed_bytes
    assert p.left_bytes == 20 * GiB - p.need_bytes and p.fits


def test_loading_from_another_dtype_counts_both_copies():
    """Every actor loads at the start; converting float32 files to bf16 holds both copies (measured: SmolLM2 actors
    at 1.27-1.6 GiB each while loading, against 0.70 GiB estimated with the bf16 copy alone)."""
    import dataclasses

    bf16 = dataclasses.replace(SIZES, target_dtype="bfloat16", stored_dtype="float32")
    p = make_plan(ray_cfg(4, 2), TWO_CORES, bf16)
    assert p.actor_target_bytes == 100_000_000 * (2 + 4)
    same = make_plan(ray_cfg(4, 2), TWO_CORES, dataclasses.replace(bf16, stored_dtype="bfloat16"))
    assert same.actor_target_bytes == 100_000_000 * 2
    assert "loading from float32" in p.render() and "loading from" not in same.render()


def test_oversubscribed_plan_shares_the_cores():
    p = make_plan(ray_cfg(16, 4), TWO_CORES, SIZES)
    assert p.oversubscribed and p.processes == 20 and p.threads == 1
    assert p.actor_cpus == p.learner_cpus == 0.1
    assert 16 * p.actor_cpus + 4 * p.learner_cpus <= 2  # Ray, told 2 CPUs, places all 20
    w = p.warning()
    assert "20 processes" in w and "2 CPUs" in w and "1 torch thread" in w
    assert plan_mod.thread_env(p) == {"DOPD_ACTOR_THREADS": "1", "DOPD_LEARNER_THREADS": "1", "OMP_NUM_THREADS": "1"}
    # 3 ranks' worth of odd shares still sum to at most the cores
    odd = make_plan(ray_cfg(5, 2), Machine(cpus=3, memory_total=GiB * 64, memory_available=GiB * 64), SIZES)
    assert odd.oversubscribed and 5 * odd.actor_cpus + 2 * odd.learner_cpus <= 3


def test_fitting_plan_reserves_learner_cpus_and_gives_threads():
    big = Machine(cpus=16, memory_total=128 * GiB, memory_available=120 * GiB)
    p = make_plan(ray_cfg(4, 2), big, SIZES)
    assert not p.oversubscribed and p.warning() is None
    assert p.threads == 16 // 6 and p.actor_cpus == 1.0
    assert p.learner_cpus >= 1.0  # a learner rank reserves what it uses (it reserved 0 before)
    assert 4 * p.actor_cpus + 2 * p.learner_cpus <= 16


def test_refusal_names_the_numbers_and_the_largest_actors_that_fits():
    small = Machine(cpus=2, memory_total=8 * GiB, memory_available=6 * GiB)
    p = make_plan(ray_cfg(16, 4), small, SIZES)
    assert not p.fits
    with pytest.raises(PlanRefused) as e:
        check(p)
    k = p.max_actors
    assert f"the largest --actors that fits with --learners 4 is {k}" in str(e.value)
    assert "6.00 GiB available" in str(e.value)
    assert k >= 1
    assert make_plan(ray_cfg(k, 4), small, SIZES).fits
    assert not make_plan(ray_cfg(k + 1, 4), small, SIZES).fits
    none = make_plan(ray_cfg(1, 4), Machine(cpus=2, memory_total=GiB, memory_available=GiB), SIZES)
    assert none.max_actors == 0 and "not even 1 actor fits" in none.refusal()


def test_in_process_plan_is_one_process():
    cfg = load_config(None, [])
    p = make_plan(cfg, TWO_CORES, SIZES)
    assert p.processes == 1 and p.threads == 2 and not p.oversubscribed and p.fixed_bytes == 0
    assert p.need_bytes == p.actor_bytes + p.learner_bytes - PROCESS_BASE_BYTES


def test_sizes_from_the_files_match_the_loaded_tiny_target(tiny):
    cfg = load_config(None, ["model.target=tiny-random-llama", "model.dtype=float32"])
    sz = plan_mod.sizes(cfg)
    assert sz.target_params == sum(p.numel() for p in tiny.model.parameters())
    from dopd.common.drafters import drafter_for_target

    d = drafter_for_target("init-eagle3", tiny)
    assert sz.drafter_trainable == sum(p.numel() for p in d.parameters() if p.requires_grad)


def test_safetensors_header_count(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    assert safetensors_params(tmp_path) == (17, "F32")
    with pytest.raises(DopdError):
        safetensors_params(tmp_path / "nothing")


# --- the command line ------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail if the CLI gets as far as training (or loading a target)."""

    def boom(*a, **k):
        raise AssertionError("the command started training")

    monkeypatch.setattr("dopd.train.train", boom)
    monkeypatch.setattr("dopd.common.models.load_target", boom)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_HOME", str(tmp_path / "home"))  # no recorded cluster
    return tmp_path


def test_actors_zero_is_an_error(no_training, home):
    res = CliRunner().invoke(app, ["train", "--actors", "0", f"out_dir={home / 'r'}"])
    assert res.exit_code == 2
    assert "leave the flag out for the in-process runner" in res.output


def test_dry_run_exit_codes(no_training, home, monkeypatch):
    args = ["train", "--actors", "2", "--learners", "1", "model.target=tiny-random-llama", "--dry-run"]
    monkeypatch.setattr(Machine, "local", classmethod(lambda cls: TWO_CORES))
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "plan: ray runner, 2 rollout actor(s), 1 learner rank(s)" in ok.output and "fits" in ok.output
    tiny_machine = Machine(cpus=2, memory_total=GiB, memory_available=512 * MiB)
    monkeypatch.setattr(Machine, "local", classmethod(lambda cls: tiny_machine))
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert "REFUSED" in refused.output and "not even 1 actor fits with --learners 1" in refused.output
    assert not (home / "r").exists()


@pytest.mark.slow
def test_printed_plan_for_16_actors_4_learners_on_smollm2(no_training, home, monkeypatch):
    """From config.json and the safetensors header only: load_target would fail the test."""
    monkeypatch.setattr(Machine, "local", classmethod(lambda cls: TWO_CORES))
    res = CliRunner().invoke(
        app,
        ["train", "--actors", "16", "--learners", "4", "model.target=smollm2-135m", "model.dtype=float32", "--dry-run"],
    )
    assert res.exit_code == 0, res.output
    out = res.output
    print(out)
    assert "plan: ray runner, 16 rollout actor(s), 4 learner rank(s) (ZeRO-2)" in out
    assert "2 CPUs, 0 GPUs, 20.00 GiB memory available of 23.00 GiB" in out
    assert "134.5M params in float32" in out  # SmolLM2-135M: 134,515,008 parameters (tied embedding)
    assert "5.09M trainable params" in out  # a one-layer EAGLE-3 drafter at width 576
    assert "per actor 1.00 GiB" in out and "0.1 Ray CPU" in out
    assert "CPUs oversubscribed (20 processes on 2 CPUs)" in out
    assert out.count("warning:") == 1
    assert "verdict   fits" in out


# --- the fleet -------------------------------------------------------------------------------------------------


def test_an_actor_without_prompts_is_an_error():
    from dopd.fleet import RolloutFleet

    cfg = ray_cfg(3, 1)
    with pytest.raises(DopdError, match="3 rollout actors but only 2 rollout prompts"):
        RolloutFleet(cfg, "t", None, [], prompts=["a", "b"])


def test_embedded_ray_is_told_the_real_cpu_count(home, monkeypatch):
    import ray

    from dopd.connection import connect

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    connect(ray_cfg(16, 4), env={"DOPD_ACTOR_THREADS": "1"})
    assert seen["num_cpus"] == plan_mod.local_cpus() == len(os.sched_getaffinity(0))
    assert seen["runtime_env"]["env_vars"]["DOPD_ACTOR_THREADS"] == "1"


# --- the run ---------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.heavy
def test_16_actors_4_learners_complete_on_this_machine(tmp_path):
    """The user's command line, in its own process with its own embedded Ray (told the real CPU count)."""
    out = tmp_path / "run"
    env = {**os.environ, "DOPD_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable, "-m", "dopd.cli", "train", "--actors", "16", "--learners", "4", "--out", str(out),
        "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=16",
        "sft.warmup_steps=1", "sft.max_new_tokens=8", "rollout.max_new_tokens=8", "rollout.batch_size=1",
        "eval.max_new_tokens=8", "eval.num_prompts=2", "learner.micro_batch_size=1", "learner.refresh_every=1",
        "learner.steps=2", "learner.eval_every=100", "learner.checkpoint_every=100", "metrics.port=0",
        "cluster.object_store_memory=200000000",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "plan: ray runner, 16 rollout actor(s), 4 learner rank(s)" in log
    assert log.count("processes (16 actors + 4 learner ranks) share") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["actors"] == 16 and summary["learners"] == 4
    assert summary["records_trained_twice"] == 0
    (Path(tmp_path) / "log.txt").write_text(log)
