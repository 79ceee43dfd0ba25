"""A learner rank: the drafter, its optimizer step, its data order, its objectives. The same class in both runners.

The in-process runner holds one (`TorchEngine`: AdamW + warm-up + clipping in plain PyTorch); the Ray runner
places M of them, each under a DeepSpeed ZeRO engine (learner/zero.py) in one torch.distributed group. Everything
else is shared, so the two runners train the same function the same way:
- the drafter is built with a placeholder vocabulary and, when a reduced draft vocabulary is asked for, picks it
  from ALL of the SFT data (`set_teacher`, before the first step: every rank sees the same data, so every rank
  picks the same ids) through the one choice `draft_vocab_for`;
- SFT micro-batches come from this rank's slice of the SFT data in `EpochSampler` order (key: seed, rank); the
  batch RNG (DFlash's random anchors, TTT) is seeded (seed, rank);
- a step asks the objective (learner/objectives/) for the batch's mask, all-reduces its weight when world > 1
  (DeepSpeed averages gradients across ranks, so dividing each rank's loss sum by the global weight / world gives
  the gradient of one token mean over every rank's micro-batch, as the official [docs/recipes.md R3] code does), and trains its loss;
- learner FLOPs are counted by PyTorch's FlopCounterMode around forward and backward (matmuls, attention,
  convolutions: everything that scales with model size; elementwise ops are not counted) on the first steps of
  each phase and one step in `FLOP_COUNT_EVERY`; the others are scaled from the last counted step of their phase
  by their positions (the counter intercepts every op in Python: counting every step cost ~30% of a step);
- `training_state` / `load` move the full optimizer state per named parameter (world-size independent), the
  schedule and each rank's RNG and data position: the one checkpoint format (dopd/checkpoint.py) either runner
  resumes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dopd.common.config import Config
from dopd.common.drafters import Drafter, build_drafter, draft_vocab_for
from dopd.common.errors import DopdError, RecordError
from dopd.common.models import resolve_dtype
from dopd.common.record import ExperienceRecord, decode_record, decode_teacher
from dopd.common.sampler import EpochSampler

from .batch import opd_batch, sft_batch
from .diagnostics import grad_norm_split, trained_alpha
from .objectives import objective_for
from .optim import make_optimizer, restore_schedule

FLOP_COUNT_EVERY = 16


class TorchEngine:
    """The in-process optimizer step: AdamW with linear warm-up (learner/optim.py), global-norm gradient clipping."""

    def __init__(self, module: torch.nn.Module, cfg: Config):
        self.module = module
        self.opt, self.sched = make_optimizer(module, cfg)
        self.clip = cfg.learner.grad_clip
        self.grad_norm = 0.0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """A parameter's whole gradient after `backward`, before `step` (the diagnostics' head / body norms)."""
        return p.grad

    def step(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def optimizer_state(self) -> dict | None:
        """{param name: {step, exp_avg, exp_avg_sq}}, the group learning rates and the schedule (None before a step)."""
        if not self.opt.state:
            return None
        names = {p: n for n, p in self.module.named_parameters()}
        state = {names[p]: {k: v.detach().cpu().clone() for k, v in s.items()} for p, s in self.opt.state.items()}
        return {"params": state, "lr": [g["lr"] for g in self.opt.param_groups], "scheduler": self.sched.state_dict()}

    def load_optimizer_state(self, blob: dict) -> None:
        params = dict(self.module.named_parameters())
        for name, s in blob["params"].items():
            p = params[name]
            self.opt.state[p] = {k: (v.to(p.device) if k != "step" else v.clone()) for k, v in s.items()}
        restore_schedule(self.sched, self.opt.param_groups, blob["scheduler"])


class Learner:
    def __init__(
        self, cfg: Config, rank: int, world: int, info, hf_config, embed: torch.Tensor, head: torch.Tensor, device,
        engine: Callable[[torch.nn.Module], TorchEngine],
    ):  # fmt: skip
        self.cfg, self.rank, self.world = cfg, rank, world
        self.info = info
        self.device = torch.device(device)
        # a reduced draft vocabulary is chosen from the SFT data (`set_teacher`) before the first step
        self.drafter: Drafter = (
            build_drafter(cfg.drafter, info, hf_config, embed, head, seed=cfg.seed, placeholder_vocab=True)
            .to(self.device)
            .train()
        )
        mask_vec = getattr(self.drafter, "mask_embedding", None)
        if (
            mask_vec is not None and not cfg.drafter.train_mask
        ):  # a fixed MASK input, as the official [docs/recipes.md R8] frozen embedding row
            mask_vec.weight.requires_grad_(False)
        self.vocab_chosen = cfg.drafter.draft_vocab_size is None or bool(cfg.drafter.init)
        self._make_engine = engine
        self._engine = None
        self.step = 0
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.teacher: list[bytes] = []
        self.sampler: EpochSampler | None = None
        self._sampler_state: dict | None = None  # a resumed position, applied when the SFT data arrives
        self.objectives = {"sft": objective_for(cfg, "sft"), "opd": objective_for(cfg, "opd")}
        # the drafter's forward in bf16 where the hardware computes it natively (model.dtype=auto), its master
        # weights, gradients and optimizer state in fp32; the losses themselves are computed in fp32 (logq upcasts)
        self.bf16 = resolve_dtype(cfg.model.dtype, str(self.device)) == "bfloat16"
        self.flops_counted: dict[
            str, tuple[float, int]
        ] = {}  # phase -> (FLOPs per position of the last counted step, counted steps)
        self.log: Callable[[str], None] | None = None

    @property
    def engine(self):
        """The optimizer engine, created on first use: after the draft vocabulary is final (ZeRO keeps its own master
        copy of the parameters from then on)."""
        if self._engine is None:
            self._engine = self._make_engine(self.drafter)
        return self._engine

    # --- data -------------------------------------------------------------------------------------------------
    def set_teacher(self, data: list[bytes]) -> int:
        """This rank's share of the SFT data (every rank gets all of it); a fresh reduced-vocabulary drafter picks
        its vocabulary from all of it."""
        good, refused = [], []
        for (
            b
        ) in data:  # validated once here (the same on every rank): a bad record is left out, never the end of a rank
            try:
                good.append((b, decode_teacher(b, vocab_size=self.info.vocab_size, hidden_size=self.info.hidden_size)))
            except RecordError as e:
                refused.append(str(e))
        if data and not good:
            raise DopdError(f"learner rank {self.rank}: every SFT record was refused, e.g. {refused[-1]}")
        if refused and self.log is not None and self.rank == 0:
            self.log(f"dopd: {len(refused)} of {len(data)} SFT records refused, e.g. {refused[-1]}")
        if not self.vocab_chosen:
            ids = draft_vocab_for(
                self.cfg.drafter, [(r.token_ids, r.prompt_len) for _, r in good], self.info.vocab_size
            )
            if self._engine is not None:
                raise RuntimeError("the draft vocabulary must be chosen before the learner's first step")
            self.drafter.set_draft_vocab(ids)
            self.vocab_chosen = True
        self.teacher = [b for b, _ in good][self.rank :: self.world]
        self.sampler = EpochSampler(len(self.teacher), (self.cfg.seed, self.rank))
        if self._sampler_state is not None:
            if self.sampler.fits(self._sampler_state):
                self.sampler.load(self._sampler_state)
            elif self.log is not None and self.rank == 0:
                self.log("dopd: the checkpoint's SFT data order was for other data or another seed: it starts afresh")
        return len(self.teacher)

    # --- steps ------------------------------------------------------------------------------------------------
    def sft_step(self) -> dict:
        if not self.teacher:
            raise RuntimeError("sft_step before set_teacher (no SFT data)")
        recs = [decode_teacher(self.teacher[i]) for i in self.sampler.take(self.cfg.learner.micro_batch_size)]
        out = self._train(sft_batch(recs, self.cfg, self.rng, self.device), "sft")
        out["records"] = 0
        return out

    def decode(self, data: bytes) -> ExperienceRecord:
        """A rollout record's one full validation (its shard read only the header): RecordError if it must be refused."""
        return decode_record(
            data, self.cfg.cluster.max_record_bytes, vocab_size=self.info.vocab_size, hidden_size=self.info.hidden_size
        )

    def opd_step(self, records: list, learner_version: int) -> dict:
        """Train on rollout records: decoded ones, or wire bytes (decoded and validated here)."""
        recs = [r if isinstance(r, ExperienceRecord) else self.decode(r) for r in records]
        obj = self.objectives["opd"]
        batch = obj.prepare(opd_batch(recs, self.cfg, self.device), recs, self.rng, self.device)
        out = self._train(batch, "opd")
        out["uids"] = [list(r.uid) for r in recs]
        out["staleness"] = [learner_version - r.policy_version for r in recs]
        out["records"] = len(recs)
        out["trained"] = [
            {
                "prompt_id": r.prompt_id,
                "token_ids": r.token_ids.tolist(),
                "prompt_len": r.prompt_len,
                "policy_version": r.policy_version,
            }
            for r in recs
        ]
        return out

    def _train(self, batch, phase: str) -> dict:
        obj = self.objectives[phase]
        engine = self.engine  # before the forward: ZeRO-3 partitions the parameters when the engine is made
        t0 = time.perf_counter()
        mask = obj.mask(batch, self.drafter.t2d)
        denom = self._global_weight(mask.weight)
        count = self.step % FLOP_COUNT_EVERY == 0 or self.flops_counted.get(phase, (0, 0))[1] < 2
        with FlopCounterMode(display=False) if count else contextlib.nullcontext() as fc:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                parts = obj.loss(self.drafter, batch, mask, step=self.step, denom=denom)
            engine.backward(parts.loss)
        diag = grad_norm_split(self.drafter.named_parameters(), engine.full_grad)
        if phase == "opd":
            diag["alpha_trained"] = trained_alpha(batch.targets)
        if count:
            flops = float(fc.get_total_flops())
            self.flops_counted[phase] = (
                flops / max(batch.num_positions, 1),
                self.flops_counted.get(phase, (0, 0))[1] + 1,
            )
        else:
            flops = self.flops_counted[phase][0] * batch.num_positions
        engine.step()
        self.step += 1
        return {
            "loss": float(parts.loss.detach()), "acc": parts.acc, "rej": parts.rej, "n_acc": parts.n_acc, "n_rej": parts.n_rej,
            "grad_norm": engine.grad_norm, "lr": engine.lr, "flops": flops,
            "seconds": time.perf_counter() - t0, "positions": batch.num_positions, **diag, **parts.info,
        }  # fmt: skip

    def _global_weight(self, local: float) -> float | None:
        """Every rank's token weight, summed, over the world size (None in a world of one: the batch's own)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        t = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    # --- weights and state --------------------------------------------------------------------------------------
    def spec(self) -> dict:
        return asdict(self.drafter.spec)

    def gather_weights(self) -> dict | None:
        """The full drafter state as numpy arrays (ZeRO-3: every rank takes part in the gather); rank 0's only."""
        module = self.drafter
        if self._engine is not None and getattr(self._engine, "zero_stage", 0) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if self.rank != 0:
            return None
        return {k: v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy() for k, v in state.items()}

    def training_state(self) -> dict:
        """This rank's part of a checkpoint: its RNGs and data position; rank 0 adds the full optimizer state and
        schedule (every rank takes part in gathering a partitioned optimizer state)."""
        opt = self._engine.optimizer_state() if self._engine is not None else None
        mine = {
            "step": self.step, "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "sampler": self.sampler.state() if self.sampler is not None else self._sampler_state,
            # which steps count FLOPs: a resumed run counts the same ones (counting runs the step under a dispatch
            # mode, which may round bf16 differently)
            "flops_counted": dict(self.flops_counted),
        }  # fmt: skip
        return {"rank": self.rank, "world": self.world, "optimizer": opt if self.rank == 0 else None, "self": mine}

    def load(self, weights: dict, state: dict, log=None) -> None:
        """Continue from a checkpoint: weights (draft vocabulary included), optimizer, schedule, this rank's RNGs and
        data position. Written by a group of another size, the per-rank streams start afresh (said in the log)."""
        if self._engine is not None:
            raise RuntimeError("a learner loads a checkpoint before its first step")
        self.log = log
        self.drafter.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        self.vocab_chosen = True
        self.step = int(state["step"])
        if state.get("optimizer") is not None:
            self.engine.load_optimizer_state(state["optimizer"])
        ranks = state.get("ranks", [])
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            self.rng.bit_generator.state = mine["rng"]
            torch.set_rng_state(mine["torch_rng"])
            self._sampler_state = mine["sampler"]
            self.flops_counted = {k: tuple(v) for k, v in mine.get("flops_counted", {}).items()}
        elif log is not None and self.rank == 0:
            log(
                f"dopd: the checkpoint was written by {len(ranks)} learner rank(s), this run has {self.world}: data order and RNG of each rank start afresh"
            )


def merge_training_states(parts: list[dict]) -> dict:
    """The ranks' `training_state` results -> one world-size-independent blob (the checkpoint's learner.pt)."""
    parts = sorted(parts, key=lambda p: p["rank"])
    opt = parts[0]["optimizer"]
    return {"step": parts[0]["self"]["step"], "optimizer": opt, "ranks": [p["self"] for p in parts]}
