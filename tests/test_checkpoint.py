"""Checkpoints survive a crash while saving: every file of a checkpoint torn in turn (truncated, as a crash mid-save
leaves it), the run resumes from the previous good one and says which and why; the optimizer state moves between a
DeepSpeed ZeRO rank (stages 0, 2, 3) and the in-process learner unchanged."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from dopd import checkpoint
from dopd.common.errors import DopdError
from dopd.common.load import load_config
from dopd.local import InProcess
from dopd.train import train

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "sft.num_prompts=16",
    "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "eval.max_new_tokens=12", "eval.num_prompts=2",
    "learner.micro_batch_size=2", "learner.refresh_every=2", "learner.lr=3e-3", "learner.eval_every=100",
]  # fmt: skip


def step_rows(d):
    return [r for r in map(json.loads, open(d / "metrics.jsonl")) if r["event"] == "step"]


def test_a_torn_checkpoint_falls_back_to_the_previous_good_one(tmp_path, tiny):
    run = tmp_path / "run"
    cfg = load_config(None, BASE + ["mode=sft", "learner.steps=4", "learner.checkpoint_every=2", f"out_dir={run}"])
    train(cfg, InProcess(cfg, target=tiny, log=lambda *a: None))
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000004"]  # the last two
    assert (root / "latest").read_text() == "step_0000004" and checkpoint.verify(root / "step_0000004") is None
    straight = [r["loss"] for r in step_rows(run)]
    newest = sorted(
        str(p.relative_to(root / "step_0000004")) for p in (root / "step_0000004").rglob("*") if p.is_file()
    )
    assert {
        "manifest.json",
        "state.json",
        "learner.pt",
        "records.msgpack",
        "drafter/config.json",
        "drafter/model.safetensors",
    } <= set(newest)

    for torn in [f"step_0000004/{f}" for f in newest] + ["latest"]:
        d = tmp_path / torn.replace("/", "_")
        shutil.copytree(run, d)
        f = d / "checkpoints" / torn
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # what a crash mid-write leaves
        logs: list[str] = []
        found = checkpoint.find(d, logs.append)
        if torn == "latest":  # latest itself torn: the newest checkpoint that verifies
            assert found.path.name == "step_0000004" and "step_0000004" in logs[0]
            continue
        assert found.path.name == "step_0000002"
        assert len(logs) == 1 and "step_0000004 is damaged" in logs[0] and "resuming from step_0000002" in logs[0], logs
        assert torn.split("/", 1)[1] in logs[0]  # the message names the damaged file
        assert (
            not (d / "checkpoints" / "step_0000004").exists() and (d / "checkpoints" / "step_0000004.damaged").is_dir()
        )
        # and the run resumes from there: the same losses as the run that never crashed
        (d / "checkpoints" / "step_0000004.damaged").rename(
            d / "checkpoints" / "step_0000004"
        )  # tear it again for train()
        rc = load_config(d / "config.yaml", [f"out_dir={d}"])
        train(rc, InProcess(rc, target=tiny, log=logs.append), resume=True)
        assert any("step_0000004 is damaged" in m and "step_0000002" in m for m in logs)
        resumed = [r for r in step_rows(d) if r["time"] > 0]
        assert [r["step"] for r in resumed][-2:] == [3, 4]
        assert [r["loss"] for r in resumed][-2:] == pytest.approx(straight[-2:], rel=1e-6, abs=1e-7)
        assert checkpoint.verify(d / "checkpoints" / "step_0000004") is None  # written again, whole

    # nothing good left: an error that names every checkpoint and what is wrong with it
    for name in ("step_0000002", "step_0000004"):
        (root / name / "learner.pt").write_bytes(b"")
    with pytest.raises(DopdError, match=r"nothing to resume .*step_0000004 is damaged.*step_0000002 is damaged"):
        checkpoint.find(run)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_optimizer_state_moves_between_deepspeed_and_the_in_process_learner(tmp_path, tiny, stage):
    """A ZeRO rank's gathered state (world 1, gloo, no Ray), loaded by a fresh ZeRO rank and by the in-process
    learner: both continue with the same losses as the rank that never stopped."""
    from dopd.actors.actor import RolloutWorker
    from dopd.learner.learner import Learner, TorchEngine, merge_training_states
    from dopd.learner.zero import make_rank
    from dopd.prompts import encode_all, load_prompt_set

    # fp32: DeepSpeed's flat-partition AdamW and the in-process per-tensor AdamW agree to float precision there; under
    # bf16 autocast they differ by more (measured: rel 6e-4 at ZeRO-3 on freshly decoded teacher data)
    over = BASE + ["model.dtype=float32", "drafter.kind=dflash", "drafter.draft_vocab_size=48", f"out_dir={tmp_path}"]
    cfg = load_config(None, over + ["runner=ray", "cluster.learners=1", f"learner.zero_stage={stage}"])
    prompts = load_prompt_set("champ-problems")[:6]
    ids, kept = encode_all(tiny.tokenizer, prompts, 256, drop_long=True)
    worker = RolloutWorker(cfg, 0, [(p.id, i) for p, i in zip(kept, ids)], incarnation=0, target=tiny)
    teacher = worker.teacher_data(worker.prompts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = make_rank(cfg, 0, 1, "127.0.0.1", port)
    a.set_teacher(teacher)
    for _ in range(2):
        a.sft_step()
    weights, state = a.gather_weights(), merge_training_states([a.training_state()])
    assert state["optimizer"] is not None and state["step"] == 2
    after = [a.sft_step()["loss"] for _ in range(2)]

    b = make_rank(cfg, 0, 1, "127.0.0.1", port)
    b.load(weights, state)
    b.set_teacher(teacher)
    assert [b.sft_step()["loss"] for _ in range(2)] == pytest.approx(after, rel=1e-6)

    lcfg = load_config(None, over)
    c = Learner(
        lcfg,
        0,
        1,
        tiny.info,
        tiny.model.config,
        tiny.embed_tokens.weight,
        tiny.lm_head.weight,
        "cpu",
        lambda m: TorchEngine(m, lcfg),
    )
    c.load(weights, state)
    c.set_teacher(teacher)
    assert [c.sft_step()["loss"] for _ in range(2)] == pytest.approx(after, rel=1e-5)
