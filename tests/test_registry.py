"""A drafter kind is one class and an objective is one object: both registered from this file alone (no other file
edited), resolved into the config at load, refused by name when unknown, and trained by the shared learner."""

from __future__ import annotations

import pytest
import torch

from dopd.common.drafters import KINDS, build_drafter, export_drafter, spec_for
from dopd.common.drafters.base import register_kind
from dopd.common.drafters.eagle3 import Eagle3Drafter
from dopd.common.errors import ConfigError, ModelError
from dopd.common.load import load_config
from dopd.learner.losses import token_logq
from dopd.learner.objectives import OBJECTIVES, Mask, Objective, logq, register

BASE = [
    "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "rollout.max_new_tokens=16",
    "learner.micro_batch_size=2",
]  # fmt: skip


@pytest.fixture
def registered():
    before_k, before_o = dict(KINDS), dict(OBJECTIVES)

    @register_kind
    class WideEagle3(Eagle3Drafter):
        kind = "test_eagle3_wide"
        default_loss = {**Eagle3Drafter.default_loss, "lambda_rej": 0.5}
        export_formats = ()

        @classmethod
        def default_feature_layers(cls, num_target_layers, num_draft_layers):
            return [1, num_target_layers // 2, num_target_layers - 2]

    @register
    class TopOneCE(Objective):
        name = "test_top1_ce"
        source = "a test of the extension point"
        defaults = {"response": "blocks", "lambda_rej": 0.0}

        def mask(self, batch, t2d):
            return Mask({"acc": batch.targets.valid.float()}, {"acc": self.lc.lambda_acc})

        def sums(self, drafter, batch, mask, step):
            ce = -token_logq(logq(drafter, batch), drafter.t2d, batch.targets.topk_ids[..., 0])
            return {"acc": (ce * mask.streams["acc"]).sum()}, {"test_positions": float(mask.streams["acc"].sum())}

    yield WideEagle3, TopOneCE
    KINDS.clear()
    KINDS.update(before_k)
    OBJECTIVES.clear()
    OBJECTIVES.update(before_o)


def test_a_new_kind_declares_its_defaults(registered, tiny):
    cfg = load_config(None, BASE + ["drafter.kind=test_eagle3_wide"])
    assert (cfg.loss.objective, cfg.loss.response, cfg.loss.lambda_rej) == ("opd", "ttt", 0.5)  # its recipe, at load
    L = tiny.info.num_layers
    assert spec_for(cfg.drafter, tiny.info, tiny.model.config).feature_layers == [1, L // 2, L - 2]
    d = build_drafter(cfg.drafter, tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert d.kind == "test_eagle3_wide"
    with pytest.raises(ModelError, match="has no speculators export"):
        export_drafter(d, "speculators", "/nonexistent")
    with pytest.raises(ConfigError, match="drafter.kind' must be one of .*test_eagle3_wide"):
        load_config(None, BASE + ["drafter.kind=medusa"])


def test_a_new_objective_trains_in_the_shared_learner(registered, tiny):
    from dopd.actors.actor import RolloutWorker
    from dopd.learner.learner import Learner, TorchEngine
    from dopd.prompts import encode_all, load_prompt_set

    cfg = load_config(None, BASE + ["drafter.kind=dflash", "loss.objective=test_top1_ce"])
    assert (cfg.loss.response, cfg.loss.lambda_rej, cfg.loss.acc_divergence) == (
        "blocks",
        0.0,
        "bernoulli",
    )  # objective's, then the kind's
    prompts = load_prompt_set("champ-problems")[:2]
    ids, kept = encode_all(tiny.tokenizer, prompts, 256, drop_long=True)
    worker = RolloutWorker(cfg, 0, [(p.id, i) for p, i in zip(kept, ids)], incarnation=0, target=tiny)
    learner = Learner(
        cfg,
        0,
        1,
        tiny.info,
        tiny.model.config,
        tiny.embed_tokens.weight,
        tiny.lm_head.weight,
        "cpu",
        lambda m: TorchEngine(m, cfg),
    )
    worker.set_weights(learner.gather_weights(), 1)
    data, _ = worker.produce(2)
    before = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    out = learner.opd_step(data, 1)
    assert out["test_positions"] > 0 and out["n_acc"] == out["test_positions"] and out["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in learner.drafter.state_dict().items())  # it trained
    with pytest.raises(ConfigError, match="loss.objective' must be one of .*test_top1_ce"):
        load_config(None, BASE + ["loss.objective=nope"])
