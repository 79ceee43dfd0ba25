"""The two runners are one: the in-process runner and the Ray runner (1 rollout actor, 1 DeepSpeed ZeRO-2 learner
rank, synchronous rounds), given the same config and seed on the tiny target, write the same files, fields and
rows, train the same records, and end with the same drafter; and each resumes the other's checkpoint.

Tolerances (what differs is only the optimizer's arithmetic: DeepSpeed steps AdamW on one flat fp32 partition and
clips with its own norm, the in-process runner per parameter tensor; measured: losses agree to ~1e-7 relative):
- step losses: rel 1e-4; the trained records (prompt, text, policy version, step): identical;
- held-out tau at every evaluation: abs 1e-6 (the drafts are argmaxes of weights that agree to float precision);
- final drafter: every tensor equal up to abs 1e-4 (weights of order 1e-1..1);
- files, summary fields, row fields: identical sets; config.yaml: identical but for `runner` and `out_dir`.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dopd import checkpoint
from dopd.common.load import load_config
from dopd.driver import RayFleet
from dopd.local import InProcess
from dopd.train import train

pytestmark = pytest.mark.ray

LOSS_REL = 1e-4
TAU_ABS = 1e-6
WEIGHT_ABS = 1e-4

SAME = [
    "model.target=tiny-random-llama", "model.dtype=float32", "data.prompts=champ-problems", "data.num_eval=4", "seed=3", "mode=opd",
    "sft.num_prompts=16", "sft.max_new_tokens=16", "rollout.max_new_tokens=16", "rollout.batch_size=2",
    "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2", "learner.refresh_every=2",
    "learner.lr=3e-3", "sft.warmup_steps=2", "learner.steps=4", "learner.eval_every=3", "learner.checkpoint_every=3",
    "cluster.actors=1", "cluster.learners=1", "cluster.rollout=sync", "metrics.enabled=false", "drafter.kind=dflash",
    "drafter.draft_vocab_size=48",
]  # fmt: skip


def rows(d, event):
    return [r for r in map(json.loads, open(d / "metrics.jsonl")) if r["event"] == event]


def seqs(d):
    return [json.loads(x) for x in open(d / "opd_sequences.jsonl")]


def files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def assert_same_run(a, b, steps_from: int = 1):
    sa, sb = rows(a, "step"), rows(b, "step")
    assert [r["step"] for r in sa] == [r["step"] for r in sb] and sa[0]["step"] == steps_from
    for x, y in zip(sa, sb):
        assert set(x) == set(y)
        assert (x["phase"], x["policy_version"], x["records"], x["n_acc"], x["n_rej"]) == (
            y["phase"],
            y["policy_version"],
            y["records"],
            y["n_acc"],
            y["n_rej"],
        )
        assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_REL)
    assert seqs(a) == seqs(b)  # the same records trained: prompt, text, the version that rolled it out, the step
    ea, eb = rows(a, "eval"), rows(b, "eval")
    assert [e["step"] for e in ea] == [e["step"] for e in eb]
    for x, y in zip(ea, eb):
        assert x["tau"] == pytest.approx(y["tau"], abs=TAU_ABS) and x["steps"] == y["steps"]
    ra, rb = rows(a, "rollout"), rows(b, "rollout")
    assert [(r["policy_version"], r["records"]) for r in ra] == [(r["policy_version"], r["records"]) for r in rb]
    wa, wb = load_file(str(a / "drafter" / "model.safetensors")), load_file(str(b / "drafter" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].shape == wb[k].shape and torch.allclose(wa[k].float(), wb[k].float(), rtol=0, atol=WEIGHT_ABS), k


def test_in_process_and_ray_runners_train_the_same(ray_session, tiny, tmp_path):
    local, ray_dir = tmp_path / "local", tmp_path / "ray"
    cfg_l = load_config(None, SAME + [f"out_dir={local}"])
    cfg_r = load_config(None, SAME + ["runner=ray", f"out_dir={ray_dir}"])
    s_l = train(cfg_l, InProcess(cfg_l, target=tiny, log=lambda *a: None))
    s_r = train(cfg_r, RayFleet(cfg_r, log=lambda *a: None))

    assert_same_run(local, ray_dir)
    assert files(local) == files(ray_dir)  # config, split, rows, sequences, both checkpoints, drafter, summary
    assert set(s_l) == set(s_r) and (s_l["runner"], s_r["runner"]) == ("local", "ray")
    for k in (
        "steps",
        "steps_planned",
        "policy_version",
        "records_trained",
        "records_produced",
        "records_trained_twice",
        "drafter_params",
    ):
        assert s_l[k] == s_r[k], k
    assert s_l["flops"] == pytest.approx(s_r["flops"], rel=1e-6)
    ya, yb = yaml.safe_load((local / "config.yaml").read_text()), yaml.safe_load((ray_dir / "config.yaml").read_text())
    assert {k: v for k, v in ya.items() if k not in ("runner", "out_dir")} == {
        k: v for k, v in yb.items() if k not in ("runner", "out_dir")
    }

    # either runner resumes the other's checkpoint (step 3: inside a synchronous round, with records pending)
    for src, runner, straight in ((ray_dir, "local", local), (local, "ray", ray_dir)):
        mid = src / "checkpoints" / "step_0000003"
        assert checkpoint.verify(mid) is None and checkpoint.Checkpoint(mid).records()  # the round's second half
        out = tmp_path / f"{runner}_from_{src.name}"
        cfg = load_config(None, SAME + [f"runner={runner}", f"resume_from={mid}", f"out_dir={out}"])
        backend = (
            InProcess(cfg, target=tiny, log=lambda *a: None)
            if runner == "local"
            else RayFleet(cfg, log=lambda *a: None)
        )
        train(cfg, backend)
        sa, sb = rows(out, "step"), [r for r in rows(straight, "step") if r["step"] > 3]
        assert [r["step"] for r in sa] == [4, 5, 6]
        assert [r["loss"] for r in sa] == pytest.approx([r["loss"] for r in sb], rel=LOSS_REL)
        assert seqs(out) == [s for s in seqs(straight) if s["step"] > 3]
