"""DVI and Bebop run in the distributed runner (2 rollout actors, 2 ZeRO-2 learner ranks) with their configs, on the
tiny target: DVI's KL -> RL switch happens at the configured step on every rank; Bebop's expected-length objective
trains on T = 1 engine rollouts, with held-out tau measured by the engine at T = 1."""

from __future__ import annotations

import json
import math

import pytest
from helpers import heldout_of_saved

from dopd.common.load import load_config
from dopd.driver import RayFleet
from dopd.train import train

pytestmark = pytest.mark.ray

BASE = [
    "runner=ray", "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
    "sft.num_prompts=16", "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.batch_size=2",
    "eval.max_new_tokens=12", "eval.num_prompts=2", "learner.micro_batch_size=2", "learner.refresh_every=2",
    "learner.lr=3e-3", "learner.zero_stage=2", "cluster.actors=2", "cluster.learners=2", "cluster.actor_num_cpus=1",
    "metrics.port=0", "learner.eval_every=100", "learner.checkpoint_every=100", "sft.warmup_steps=2", "learner.steps=4",
]  # fmt: skip


def rows(path):
    return [json.loads(x) for x in open(path / "metrics.jsonl")]


def test_dvi_trains_in_the_distributed_runner(ray_session, tmp_path):
    from dopd.common.drafters import load_drafter
    from dopd.common.models import load_frozen_io

    cfg = load_config(
        None, BASE + ["drafter.kind=dvi", "drafter.lora_rank=4", "dvi.rl_start_step=4", f"out_dir={tmp_path}"]
    )
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
    assert summary["steps"] == 6 and summary["records_trained_twice"] == 0
    fresh = heldout_of_saved(cfg, cfg.out_dir)  # the saved drafter, measured again in this process
    assert (fresh["tau"], fresh["alpha"]) == pytest.approx((summary["tau"], summary["alpha"]), abs=1e-9)
    steps = [r for r in rows(tmp_path) if r["event"] == "step"]
    assert [(r["phase"], r.get("dvi_phase")) for r in steps] == [("sft", None)] * 2 + [("opd", "kl")] * 2 + [
        ("opd", "rl")
    ] * 2
    assert all(math.isfinite(r["loss"]) for r in steps)
    info, embed, head, _ = load_frozen_io("tiny-random-llama")
    d = load_drafter(tmp_path / "drafter", info, embed, head)
    assert d.kind == "dvi" and float(d.lora_A.abs().sum()) > 0  # the low-rank head was trained (A starts at 0)


def test_bebop_expected_length_trains_in_the_distributed_runner(ray_session, tmp_path):
    cfg = load_config(None, BASE + [
        "drafter.kind=eagle3", "loss.objective=expected_length", "rollout.temperature=1", "eval.temperature=1", f"out_dir={tmp_path}",
    ])  # fmt: skip
    summary = train(cfg, RayFleet(cfg, log=lambda *a: None))
    assert summary["steps"] == 6 and summary["records_trained_twice"] == 0
    fresh = heldout_of_saved(cfg, cfg.out_dir)  # the saved drafter, measured again in this process
    assert (fresh["tau"], fresh["alpha"]) == pytest.approx((summary["tau"], summary["alpha"]), abs=1e-9)
    r = rows(tmp_path)
    evals = [x for x in r if x["event"] == "eval"]
    assert evals and not any(x["simulated"] for x in evals)  # T = 1: the engine measures tau
    opd = [x for x in r if x["event"] == "step" and x["phase"] == "opd"]
    assert len(opd) == 4 and all(-4 <= x["loss"] <= 0 for x in opd)  # minus the mean expected accepted length (K = 4)


@pytest.mark.parametrize("method", ["dvi", "bebop_e2e"])
def test_zero_rank_trains_the_methods_without_ray(tmp_path, tiny, method):
    """The distributed runner's two sides without Ray (where Ray cannot start): the rollout worker a Ray actor wraps
    produces wire records, a DeepSpeed ZeRO-2 learner rank (world 1, gloo) trains them with the shared objective;
    DVI's phase follows the rank's own step count, Bebop's loss is minus an expected length in [-K, 0]."""
    import socket

    from dopd.actors.actor import RolloutWorker
    from dopd.common.record import encode_teacher
    from dopd.learner.zero import make_rank
    from dopd.prompts import encode_all, load_prompt_set

    extra = ["drafter.kind=dvi", "drafter.lora_rank=4", "dvi.rl_start_step=3"] if method == "dvi" else [
        "drafter.kind=eagle3", "loss.objective=expected_length", "rollout.temperature=1"]  # fmt: skip
    cfg = load_config(None, BASE + extra + ["cluster.learners=1", f"out_dir={tmp_path}"])
    prompts = load_prompt_set("champ-problems")[:8]
    ids, kept = encode_all(tiny.tokenizer, prompts, 256, drop_long=True)
    worker = RolloutWorker(cfg, 0, [(p.id, i) for p, i in zip(kept, ids)], incarnation=0, target=tiny)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank = make_rank(cfg, 0, 1, "127.0.0.1", port)
    rank.set_teacher(
        [encode_teacher(r) for r in worker.maker.teacher(worker.drafter.feature_layers, worker.prompts[:4])]
    )
    out = [rank.sft_step(), rank.sft_step()]
    for v in range(2):
        worker.set_weights(rank.gather_weights(), v + 1)
        data, _ = worker.produce(2)
        out.append(rank.opd_step(data, v + 1))
    assert rank.step == 4 and all(math.isfinite(o["loss"]) for o in out)
    if method == "dvi":
        assert [o.get("dvi_phase") for o in out] == [None, None, "kl", "rl"]
    else:
        assert all(-cfg.rollout.block_size <= o["loss"] <= 0 for o in out[2:]) and "dvi_phase" not in out[-1]
