"""The in-process backend (no Ray): one rollout worker and one learner rank in this process.

The same pieces the Ray runner places: the actor side is a `RolloutWorker` (a policy copy of the drafter and the
shared recipe `ExperienceMaker`), whose records are encoded to the wire format and decoded by the learner exactly
as the queue carries them; the learner side is the shared `Learner` (learner/learner.py) with a plain PyTorch
optimizer step. Rounds are synchronous: before an OPD step that finds fewer than a micro-batch of records, the
worker rolls out `refresh_every * micro_batch_size` prompts with the last published weights, so each record is
trained on once, by the learner version right after the one that produced it (0 versions stale), as in the
official code [docs/recipes.md R7]. The loop (dopd/train.py) does the rest.
"""

from __future__ import annotations

import torch

from dopd.actors.actor import RolloutWorker
from dopd.backend import Accounts, Backend, RunState, aggregate
from dopd.common.config import Config
from dopd.common.drafters import Drafter
from dopd.common.models import Target, load_target
from dopd.learner.learner import Learner, TorchEngine, merge_training_states
from dopd.prompts import check_sources, read_sequences, run_prompts
from dopd.sinks import RowMetrics


class InProcess(Backend):
    name = "local"

    def __init__(self, cfg: Config, target: Target | None = None, log=print):
        super().__init__(cfg, log)
        torch.manual_seed(cfg.seed)
        check_sources(cfg)  # a missing data file is named before the target is loaded
        self.target = target or load_target(
            cfg.model.target, cfg.model.device, cfg.model.dtype, forward=cfg.model.forward, compile=cfg.model.compile
        )
        t = self.target
        self.target_info = t.info.to_dict()
        self.prompts = run_prompts(cfg, t.tokenizer)
        # incarnation 0: one process, never restarted
        self.worker = RolloutWorker(cfg, 0, self.prompts.rollout, incarnation=0, target=t, log=log)
        self.learner = Learner(
            cfg,
            0,
            1,
            t.info,
            t.model.config,
            t.embed_tokens.weight,
            t.lm_head.weight,
            t.device,
            lambda m: TorchEngine(m, cfg),
        )
        self.buffer: list[bytes] = []  # records rolled out, not trained yet
        self.produced = 0
        self.sinks: RowMetrics | None = None  # TensorBoard / W&B, when on: fed from the loop's rows

    @property
    def drafter(self) -> Drafter:
        """The learner's drafter (its current weights)."""
        return self.learner.drafter

    def start(self, state: RunState, ckpt, resumed: bool) -> None:
        self.write_split(self.prompts.split)
        self.log(self.prompts.summary())
        self.sinks = RowMetrics.for_config(self.cfg, lambda: state, fresh=not resumed)
        if ckpt is not None:
            self.learner.load(ckpt.weights(), ckpt.learner(), log=self.log)
            self.buffer = ckpt.records()
            actors = state.runner.get("actors", [])
            if len(actors) == 1:
                if not self.worker.load_state(actors[0]):
                    self.log(
                        "dopd: the checkpoint's prompt order was for other prompts or another seed: it starts afresh"
                    )
            elif actors:
                self.log(
                    f"dopd: the checkpoint has {len(actors)} rollout actors, this run 1: the prompt order starts afresh"
                )
            self.produced = state.runner.get("records_produced", 0)

    def sft_data(self, needed: bool) -> None:
        if not (needed or not self.learner.vocab_chosen):
            return
        c = self.cfg
        items = read_sequences(c.sft.sequences) if c.sft.sequences else self.prompts.sft
        self.learner.set_teacher(self.worker.teacher_data(items))

    def rollout(self, state: RunState) -> list[dict]:
        c = self.cfg.learner
        if len(self.buffer) >= c.micro_batch_size:
            return []
        data, st = self.worker.produce(c.refresh_every * c.micro_batch_size)
        self.buffer.extend(data)
        self.produced += len(data)
        return [rollout_row(0, st)]

    def learn(self, phase: str, state: RunState) -> dict:
        if phase == "sft":
            return aggregate([self.learner.sft_step()])
        mb = self.cfg.learner.micro_batch_size
        batch, self.buffer = self.buffer[:mb], self.buffer[mb:]
        return aggregate([self.learner.opd_step(batch, state.policy_version)])

    def publish(self, version: int) -> None:
        self.worker.set_weights(self.learner.gather_weights(), version)

    def evaluate(self) -> dict:
        return self.worker.maker.evaluate(self.learner.drafter, self.prompts.eval_ids[: self.cfg.eval.num_prompts])

    def spec(self) -> dict:
        return self.learner.spec()

    def weights(self) -> dict:
        return self.learner.gather_weights()

    def training_state(self) -> dict:
        return merge_training_states([self.learner.training_state()])

    def drafter_params(self) -> int:
        return self.learner.drafter.num_parameters()

    def pending(self) -> list[bytes]:
        return list(self.buffer)

    def save_state(self, state: RunState) -> None:
        state.runner = {"actors": [self.worker.state()], "records_produced": self.produced}

    def observe(self, row: dict, state: RunState) -> None:
        if self.sinks is not None:
            self.sinks.observe(row)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None

    def accounts(self, state: RunState) -> Accounts:
        return Accounts(self.produced, state.records_trained, records_queued=len(self.buffer))


def rollout_row(actor: int, st: dict) -> dict:
    """A rollout batch's row (the same fields from both runners)."""
    return {
        "actor": actor, "policy_version": st["policy_version"], "records": st["records"], "rollout_tau": st["tau"],
        "rollout_alpha": st["alpha"], "rollout_tokens": st["tokens"], "rollout_s": st["rollout_s"],
        "rollout_tokens_per_s": st["tokens"] / max(st["rollout_s"], 1e-9), "replay_anchors": st["anchors"],
        "replay_s": st["replay_s"], "path": st["path"],
    }  # fmt: skip


__all__ = ["InProcess", "rollout_row"]
