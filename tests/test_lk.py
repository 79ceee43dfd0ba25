"""The LK objective (learner/objectives/lk.py, arXiv 2602.23881): -log sum_v min(p, q) against hand-computed
values, its loss on real rollout records against a per-position reference written out here, its declaration of
what the actor records, and a tiny `dopd train` with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dopd.cli import app
from dopd.common.errors import ConfigError
from dopd.common.load import load_config
from dopd.learner.objectives import OBJECTIVES
from dopd.learner.objectives.lk import LK, acceptance, lk_alpha_loss

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "rollout.max_new_tokens=16",
    "learner.micro_batch_size=2", "loss.objective=lk",
]  # fmt: skip


def test_acceptance_and_loss_by_hand():
    # q = softmax(0, ln 3) = (1/4, 3/4); p = softmax(h . rows) with equal rows = (1/2, 1/2):
    # alpha = min(1/4, 1/2) + min(3/4, 1/2) = 3/4, loss = -ln(3/4) = 0.2876821
    q_logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    head = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    a = acceptance(q_logits, torch.tensor([[0.7, -2.0]]), head, None)
    assert a.item() == pytest.approx(0.75, abs=1e-6)
    loss = lk_alpha_loss(a)
    assert loss.item() == pytest.approx(0.2876821, abs=1e-6)
    # gradient by hand: d(-log alpha)/dq = -1/alpha where q < p (token 0), 0 where q > p (token 1); through the
    # softmax, dL/dz_0 = -(1/alpha) q0 (1 - q0) = -(4/3)(3/16) = -1/4, dL/dz_1 = +1/4
    loss.backward()
    assert torch.allclose(q_logits.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6)
    # a reduced draft vocabulary {0, 2} of V = 3: q = (1/2, 0, 1/2); p = softmax(0, ln 2, 0) = (1/4, 1/2, 1/4):
    # alpha = 1/4 + 0 + 1/4 = 1/2
    head3 = torch.tensor([[0.0], [math.log(2.0)], [0.0]])
    a3 = acceptance(torch.zeros(1, 2), torch.ones(1, 1), head3, torch.tensor([0, 2]))
    assert a3.item() == pytest.approx(0.5, abs=1e-6)
    assert lk_alpha_loss(torch.tensor([0.0])).item() == pytest.approx(-math.log(1e-8))  # floored, finite


def test_lk_declares_its_settings_and_records():
    cfg = load_config(None, BASE)
    assert OBJECTIVES["lk"] is LK and cfg.loss.objective == "lk"
    assert (cfg.loss.response, cfg.loss.lambda_rej) == ("blocks", 0.0)  # its defaults win over eagle3's ttt
    assert cfg.loss.records == ["blocks", "hidden"]
    with pytest.raises(ConfigError, match="loss.response must be blocks"):
        load_config(None, BASE + ["loss.response=ttt"])


def test_lk_loss_on_rollout_records_matches_reference(tiny):
    """The objective's loss on a real batch = the token mean, over the blocks' offsets 1..r, of -log sum_v
    min(p, q) computed position by position here (p from the target's hidden state, q over the draft vocabulary)."""
    from dopd.actors.actor import RolloutWorker
    from dopd.learner.batch import opd_batch
    from dopd.learner.learner import Learner, TorchEngine
    from dopd.prompts import encode_all, load_prompt_set

    cfg = load_config(None, BASE + ["drafter.kind=dflash", "drafter.draft_vocab_size=64"])
    prompts = load_prompt_set("champ-problems")[:2]
    ids, kept = encode_all(tiny.tokenizer, prompts, 256, drop_long=True)
    worker = RolloutWorker(cfg, 0, [(p.id, i) for p, i in zip(kept, ids)], incarnation=0, target=tiny)
    learner = Learner(cfg, 0, 1, tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight, "cpu",
                      lambda m: TorchEngine(m, cfg))  # fmt: skip
    learner.set_teacher([])  # no SFT data: keep the placeholder vocabulary ids 0..63
    worker.set_weights(learner.gather_weights(), 1)
    data, _ = worker.produce(2)
    recs = [learner.decode(b) for b in data]
    assert all(r.target_hidden is not None for r in recs)  # the declared "hidden" was recorded
    d, obj = learner.drafter, LK(cfg)
    batch = obj.prepare(opd_batch(recs, cfg, "cpu"), recs, np.random.default_rng(0), "cpu")
    mask = obj.mask(batch, d.t2d)
    parts = obj.loss(d, batch, mask)
    T = batch.targets
    with torch.no_grad():
        lg = d.logits(d.block_hidden(batch.tokens, batch.features, batch.lengths, batch.anchors, batch.block_tokens))
    terms = []
    for b, m, k in zip(*torch.nonzero(mask.streams["lk"] > 0, as_tuple=True)):
        b, m, k = int(b), int(m), int(k)
        # the position is in its block's first-rejection prefix: every earlier offset accepted
        assert bool(T.accept[b, m, :k].all())
        q = torch.zeros(tiny.info.vocab_size)
        q[d.draft_ids] = torch.softmax(lg[b, m, k].float(), -1)
        p = torch.softmax(tiny.lm_head.weight.float() @ T.hidden[b, m, k].float(), -1)
        terms.append(-math.log(float(sum(min(float(pi), float(qi)) for pi, qi in zip(p, q)))))
    assert len(terms) > 0 and parts.loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert parts.info["lk_alpha"] == pytest.approx(
        float(np.mean([math.exp(-t) for t in terms])), rel=1e-4
    )  # fmt: skip


@pytest.mark.heavy
def test_tiny_dopd_train_with_lk(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--threads", "2", "--out", str(out), *BASE, "sft.warmup_steps=2",
                                 "learner.steps=3", "learner.refresh_every=1", "learner.eval_every=5",
                                 "sft.max_new_tokens=16", "eval.max_new_tokens=8"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    opd = [x for x in rows if x.get("phase") == "opd"]
    assert len(opd) == 3 and all(x["n_lk"] > 0 and 0 < x["lk_alpha"] <= 1 and x["loss"] > 0 for x in opd), opd
    assert json.loads((out / "summary.json").read_text())["steps"] == 5 and (out / "drafter").is_dir()
