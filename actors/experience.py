"""The one rollout recipe: prompts -> experience records, SFT data and held-out tau, for both runners.

`ExperienceMaker` holds a target and the run config; the in-process runner (dopd/local.py) and every Ray rollout
actor (actors/actor.py) call the same methods, so the two runners cannot drift apart. A prompt item is (id, prompt
ids), or (id, prompt ids, answer ids) with data.answers=as_is: the target's text for it is then the dataset's
answer, teacher-forced (`actors/target_text.py`), in the SFT data and in the rounds alike.

A round (`records`):
1. roll out with the current drafter: at T = 0 by re-segmenting the cached greedy text (`actors/resegmented.py`),
   else with the engine (`actors/rollout.py`);
2. lay out the blocks the recipe trains (`cfg.loss`, resolved at load; `cfg.replay`):
   - `replay.anchors=rollout` (official [docs/recipes.md R1]): the rollout's own verification blocks, re-run by the learner with the
     current weights; they feed the accepted stream (unless `loss.response=ttt`: EAGLE-3's recipe trains every
     position instead) and, when lambda_rej > 0, the rejected stream (then the tails are scored by the target):
     what the objective declared (`loss.records`);
   - `replay.anchors=shuffled` (the authors' ablation [docs/recipes.md R9]): the same multiset of segment lengths shuffled over the
     response with random gaps, teacher-labelled, for the accepted stream; the true blocks only for the rejected one;
   - `replay.extra`: extra blocks drafted again from chosen positions and scored (dopd's first-wave mechanism);
3. records carry the text, its features (bf16), those blocks, and the per-position teacher when TTT needs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dopd.common.config import Config
from dopd.common.drafters import Drafter
from dopd.common.evaluation import heldout
from dopd.common.greedy import prefill
from dopd.common.models import Target
from dopd.common.record import SOURCE_SHUFFLED, STREAM_ACC, STREAM_REJ, Blocks, ExperienceRecord, TeacherRecord
from dopd.common.specdec import DecodeSettings, tau_alpha

from .replay import Replayer, choose_anchors
from .resegmented import resegmented_rollout
from .rollout import Rolled, acc_only, engine_rollout
from .target_text import text_data


@dataclass
class RoundStats:
    tau: float
    alpha: list[float]
    tokens: int  # committed answer tokens
    rollout_s: float
    replay_anchors: int
    replay_s: float
    path: str  # "resegment" | "engine"


def shuffled_plan(
    seg_lens: np.ndarray, prompt_len: int, response_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' random-anchor ablation [docs/recipes.md R9]: the segment lengths in random order, laid over the response with the
    leftover tokens spread as random gaps (token count preserved). Returns (anchors as prefix lengths, lengths)."""
    lens = rng.permutation(np.asarray(seg_lens, dtype=np.int64))
    spare = response_len - int(lens.sum())
    if spare < 0:
        raise ValueError(f"segments cover {int(lens.sum())} tokens, more than the response's {response_len}")
    gaps = (
        np.bincount(rng.integers(0, lens.size + 1, size=spare), minlength=lens.size + 1)
        if spare
        else np.zeros(lens.size + 1, dtype=np.int64)
    )
    starts = (
        gaps[0] + np.concatenate([[0], np.cumsum(lens[:-1] + gaps[1:-1])]) if lens.size else np.zeros(0, dtype=np.int64)
    )
    return prompt_len + starts.astype(np.int64), lens


def shuffled_blocks(seq: Rolled, K: int, topk: int, rng: np.random.Generator) -> Blocks:
    """Accepted-stream blocks at shuffled anchors, teacher-labelled (block inputs = the true tokens)."""
    b, t = seq.blocks, seq.teacher
    committed = np.diff(np.append(b.anchor.astype(np.int64), len(seq.tokens)))
    lens = np.minimum(committed, K)  # the official [docs/recipes.md R1] segment: the step's committed tokens, at most K
    anchors, lens = shuffled_plan(lens, seq.prompt_len, len(seq.tokens) - seq.prompt_len, rng)
    n_rows = t.topk_ids.shape[0]
    pos = anchors[:, None] + np.arange(K)[None, :]  # token positions a..a+K-1
    rows = np.minimum(pos - 1, n_rows - 1)
    toks = np.asarray(t.token_ids, dtype=np.int64)
    d = toks[np.minimum(pos, toks.size - 1)]
    ids, probs = t.topk_ids[rows][..., :topk], t.topk_probs[rows][..., :topk]
    M = anchors.size
    return Blocks(
        anchor=anchors.astype(np.int32), draft_tokens=d.astype(np.int32), draft_logprobs=np.zeros((M, K), np.float32),
        target_topk_ids=ids.astype(np.int32), target_topk_probs=probs.astype(np.float32), target_tail=t.tail[rows].astype(np.float32),
        target_draft_prob=(probs * (ids == d[..., None])).sum(-1).astype(np.float32),
        accept_mask=np.arange(K)[None, :] < (lens - 1)[:, None],  # first L-1 "accepted", L-th = the first rejection
        source=np.full(M, SOURCE_SHUFFLED, np.uint8), streams=np.full(M, STREAM_ACC, np.uint8),
    )  # fmt: skip


def prefill_rolled(
    target: Target, feature_layers: list[int], seqs: list[Rolled], topk: int, hidden: bool = False
) -> None:
    """Engine rollouts: the per-position teacher (and the target's hidden state) from one prefill of the committed text (in place)."""
    recs = prefill(target, feature_layers, [(s.prompt_id, s.tokens, s.prompt_len) for s in seqs], topk, hidden=hidden)
    for s, r in zip(seqs, recs):
        s.teacher = r


class ExperienceMaker:
    """Target-side work of a run: rollout rounds -> records, SFT warm-up data, held-out tau."""

    def __init__(self, target: Target, cfg: Config, log=None):
        self.target = target
        self.cfg = cfg
        self.loss = cfg.loss
        self.log = log
        self.replayer = Replayer(target, cfg.replay, cfg.rollout, batch_size=cfg.rollout.batch_size)

    # --- what the recipe needs from a rollout ------------------------------------------------------------------
    @property
    def resegment(self) -> bool:
        return self.cfg.rollout.path == "auto" and self.cfg.rollout.temperature <= 0

    # what the objective declared it needs (`loss.records`, filled at load by `Objective.records`), plus what this
    # side's own settings need (shuffled anchors are teacher-labelled; the replay diagnostic compares hidden states)
    @property
    def needs_rejected(self) -> bool:
        return "scored" in self.records_declared

    @property
    def needs_teacher(self) -> bool:
        return "teacher" in self.records_declared or self.cfg.replay.anchors == "shuffled"

    @property
    def needs_hidden(self) -> bool:
        """Records carry the target's final hidden state along the answer: the objective's declaration or the
        replay-mismatch diagnostic (`metrics.replay_kl`)."""
        return "hidden" in self.records_declared or self.cfg.metrics.replay_kl

    @property
    def records_declared(self) -> set[str]:
        if self.loss.records is None:
            raise ValueError(
                "loss.records is unset: the config was not resolved (dopd.common.load: load_config / resolve)"
            )
        return set(self.loss.records)

    def rollout(self, drafter: Drafter, prompts: list[tuple], seed: int) -> tuple[list[Rolled], RoundStats]:
        cfg = self.cfg
        t0 = time.perf_counter()
        if (
            any(len(p) == 3 for p in prompts) and not self.resegment
        ):  # config validation refuses this; a direct caller too
            raise ValueError(
                "items with given answers (data.answers=as_is) are re-segmented, not decoded: rollout.path=auto at T = 0"
            )
        if self.resegment:
            seqs, rs = resegmented_rollout(
                self.target, drafter, prompts, cfg, score=self.needs_rejected, log=self.log, hidden=self.needs_hidden
            )
            accepted, tokens, path = rs.accepted, rs.new_tokens, "resegment"
        else:
            seqs, st = engine_rollout(self.target, drafter, prompts, cfg.rollout, seed)
            accepted = [int(a) for s in seqs for a in s.accepted]
            tokens, path = st.new_tokens, "engine"
            if self.needs_teacher or self.needs_hidden:
                prefill_rolled(self.target, drafter.feature_layers, seqs, cfg.rollout.topk, hidden=self.needs_hidden)
        tau, alpha = tau_alpha(accepted, cfg.rollout.block_size)
        return seqs, RoundStats(tau, alpha, tokens, time.perf_counter() - t0, 0, 0.0, path)

    def records(
        self, drafter: Drafter, prompts: list[tuple], version: int, actor_id: int, incarnation: int,
        seq_no: int, seed: int, rng: np.random.Generator, meta: dict | None = None,
    ) -> tuple[list[ExperienceRecord], RoundStats]:  # fmt: skip
        """One round: rollout with this drafter -> one record per prompt, laid out by the recipe."""
        cfg = self.cfg
        K, topk = cfg.rollout.block_size, cfg.rollout.topk
        seqs, stats = self.rollout(drafter, prompts, seed)
        extra: list[Blocks] = [Blocks.empty(K, topk) for _ in seqs]
        if cfg.replay.extra != "none":
            t0 = time.perf_counter()
            anchors = [
                choose_anchors(s, cfg.replay.extra, drafter.context_start() + 1, cfg.replay.max_anchors_per_seq, rng)
                for s in seqs
            ]
            extra, rep = self.replayer.replay(drafter, seqs, anchors, seed)
            stats.replay_anchors, stats.replay_s = rep.anchors, time.perf_counter() - t0
        out = []
        for i, (s, ex) in enumerate(zip(seqs, extra)):
            parts = [self._true_blocks(s), ex]
            if cfg.replay.anchors == "shuffled":
                parts.append(shuffled_blocks(s, K, topk, rng))
            n = len(s.tokens)
            t = s.teacher if self.needs_teacher else None
            out.append(
                ExperienceRecord(
                    prompt_id=s.prompt_id,
                    token_ids=np.asarray(s.tokens, dtype=np.int32),
                    prompt_len=s.prompt_len,
                    blocks=Blocks.concat(parts),
                    features=s.features[: n - 1].to(torch.bfloat16),
                    actor_id=actor_id,
                    incarnation=incarnation,
                    seq_no=seq_no + i,
                    policy_version=version,
                    meta={"block_size": K, "temperature": cfg.rollout.temperature, "path": stats.path, **(meta or {})},
                    teacher_topk_ids=None if t is None else t.topk_ids[: n - 1],
                    teacher_topk_probs=None if t is None else t.topk_probs[: n - 1],
                    teacher_tail=None if t is None else t.tail[: n - 1],
                    target_hidden=s.teacher.hidden[: n - s.prompt_len] if self.needs_hidden else None,
                )  # fmt: skip
            )
        return out, stats

    def _true_blocks(self, s: Rolled) -> Blocks:
        """The rollout's verification blocks, flagged with the streams this recipe trains on them."""
        b = s.blocks if s.scored else acc_only(s.blocks)
        acc = "blocks" in self.records_declared and self.cfg.replay.anchors == "rollout"
        rej = self.needs_rejected and s.scored
        flag = (STREAM_ACC if acc else 0) | (STREAM_REJ if rej else 0)
        if flag == 0:
            return Blocks.empty(b.block_size, b.target_topk_ids.shape[2])
        return Blocks(**{**{f: getattr(b, f) for f in Blocks.FIELDS}, "streams": np.full(len(b), flag, np.uint8)})

    # --- SFT data and evaluation -----------------------------------------------------------------------------
    def teacher(self, feature_layers: list[int], prompts: list[tuple]) -> list[TeacherRecord]:
        """SFT warm-up data: the target's greedy answers (or the dataset's, data.answers=as_is), teacher-forced (cached)."""
        c = self.cfg
        if c.sft.temperature > 0:
            raise ValueError("sft.temperature > 0 is not supported: SFT data is the target's greedy text (cached)")
        _, recs = text_data(self.target, feature_layers, prompts, c.sft.max_new_tokens, c.rollout.topk, log=self.log)
        return recs

    def eval_settings(self) -> DecodeSettings:
        c = self.cfg
        return DecodeSettings(
            block_size=c.eval_block_size, temperature=c.eval.temperature, max_new_tokens=c.eval.max_new_tokens,
            batch_size=c.rollout.batch_size, seed=c.seed,
        )  # fmt: skip

    def evaluate(self, drafter: Drafter, prompt_ids: list[list[int]]) -> dict:
        """Held-out tau and alpha (common/evaluation.py `heldout`): exact simulation from the cached greedy text at
        T = 0 (`eval.simulate`), else one engine pass."""
        return heldout(self.target, drafter, prompt_ids, self.eval_settings(), simulate=self.cfg.eval.simulate)
