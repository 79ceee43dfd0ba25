"""A learner rank: the drafter under a DeepSpeed ZeRO engine, fed from its own queue shard(s).

`LearnerRank` is plain Python (one rank runs in a test process); the distributed job wraps it in a Ray actor and
starts M of them in one torch.distributed group (gloo on CPU, NCCL on GPU). Each step a rank pulls a micro-batch
of records from its shard, runs the same forward and loss as the in-process trainer (learner/objective.py), and
DeepSpeed averages gradients across ranks (ZeRO stage 0-3 from the config; `learner.deepspeed` is merged into the
generated DeepSpeed config). A rank holds only the drafter plus the target's frozen embedding and head (read
straight from the target's safetensors), never the target body.

Differences from the in-process trainer: the ranks all-reduce their token weights before the forward, so the
averaged gradient is that of one token mean over every rank's micro-batch (as the official code does); records
arrive asynchronously, up to `cluster.max_staleness` policy versions old.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dopd.common.config import Config
from dopd.common.drafters import build_drafter, draft_vocab_from_counts, token_counts
from dopd.common.models import load_frozen_io
from dopd.common.errors import DopdError, RecordError
from dopd.common.record import ExperienceRecord, TeacherRecord, decode_record, decode_teacher

from .objective import compute_loss, denominator, make_batch
from .optim import make_optimizer


def deepspeed_config(cfg: Config, world: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.learner.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.learner.micro_batch_size * world,
        "gradient_clipping": cfg.learner.grad_clip,
        "zero_optimization": {"stage": cfg.learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in cfg.learner.deepspeed.items():
        if isinstance(v, dict) and isinstance(ds.get(k), dict):
            ds[k] = {**ds[k], **v}
        else:
            ds[k] = v
    return ds


@dataclass
class RankState:
    step: int = 0
    sft_cursor: int = 0
    sft_epoch: int = 0
    extra: dict = field(default_factory=dict)


class LearnerRank:
    def __init__(self, cfg: Config, rank: int, world: int, master_addr: str, master_port: int, device: str = "cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")  # Ray gives each rank its own visible GPU(s)
        import deepspeed

        try:  # the shm all-reduce op compiles for a minute on first use and leaves /dev/shm files behind
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except Exception:
            pass
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device("cpu" if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False)
        info, embed, head, hf_config = load_frozen_io(cfg.model.target)
        # a reduced draft vocabulary is chosen from the SFT data (`set_teacher`) before the first step
        self._drafter = build_drafter(cfg.drafter, info, hf_config, embed, head, seed=cfg.seed, placeholder_vocab=True).to(self.device)
        self.info = info
        self._engine = None
        self.state = RankState()
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.teacher: list[TeacherRecord] = []
        self.teacher_refused: list[str] = []

    @property
    def engine(self):
        """The DeepSpeed engine, created on first use: after `set_teacher` has chosen a reduced draft vocabulary
        (ZeRO keeps its own master copy of the parameters from then on, so they must be final by then)."""
        if self._engine is None:
            import deepspeed

            opt, sched = make_optimizer(self._drafter, self.cfg)
            self._engine, _, _, self.sched = deepspeed.initialize(model=self._drafter, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(self.cfg, self.world))
        return self._engine

    @property
    def drafter(self):
        return self.engine.module

    # --- steps ------------------------------------------------------------------------------------------------
    def _train(self, batch, mode: str) -> dict:
        t0 = time.perf_counter()
        denom = self._global_denominator(batch, mode)
        with FlopCounterMode(display=False) as fc:
            parts = compute_loss(self.drafter, batch, self.cfg, mode, denom, step=self.state.step)
            self.engine.backward(parts.loss)
        self.engine.step()
        gnorm = self.engine.get_global_grad_norm()
        self.state.step += 1
        return {
            "loss": float(parts.loss.detach()), "acc": parts.acc, "rej": parts.rej, "n_acc": parts.n_acc,
            "n_rej": parts.n_rej, "grad_norm": float(gnorm) if gnorm is not None else 0.0,
            "flops": float(fc.get_total_flops()), "seconds": time.perf_counter() - t0, "lr": self.sched.get_last_lr()[0],
            **({"dvi_phase": parts.phase} if parts.phase else {}),
        }  # fmt: skip

    def _global_denominator(self, batch, mode: str) -> float | None:
        """Every rank's token weight, summed, over the world size: DeepSpeed averages gradients across ranks, so
        dividing each rank's loss sum by this gives the gradient of one token mean over all ranks' batches (a rank
        with few accepted tokens would otherwise weigh as much as one with many)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        local = denominator(self.drafter, batch, self.cfg, mode)
        t = torch.tensor([local], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def decode(self, data: bytes) -> ExperienceRecord:
        """A record's one full validation (its shard read only the header): RecordError if it must be refused."""
        return decode_record(data, self.cfg.cluster.max_record_bytes, vocab_size=self.info.vocab_size)

    def opd_step(self, records: list, learner_version: int) -> dict:
        """Train on records already pulled from this rank's shard (the Ray wrapper pulls and decodes them)."""
        recs = [r if isinstance(r, ExperienceRecord) else self.decode(r) for r in records]
        batch = make_batch(recs, self.cfg, "opd", self.rng, self.device)
        out = self._train(batch, "opd")
        out["uids"] = [list(r.uid) for r in recs]
        out["staleness"] = [learner_version - r.policy_version for r in recs]
        out["records"] = len(recs)
        return out

    def set_teacher(self, data: list[bytes]) -> int:
        """This rank's share of the SFT data; a fresh reduced-vocabulary drafter picks its vocabulary from ALL of it
        (every rank sees the same data, so every rank picks the same ids)."""
        c = self.cfg.drafter

        def decode(b: bytes) -> TeacherRecord | None:
            try:
                return decode_teacher(b, vocab_size=self.info.vocab_size)
            except RecordError as e:  # a bad record is left out (the same on every rank), never the end of the rank
                self.teacher_refused.append(str(e))
                return None

        if c.draft_vocab_size is not None and not c.init and self.state.step == 0 and not self.state.extra.get("vocab"):
            recs = [r for r in map(decode, data) if r is not None]
            ids = draft_vocab_from_counts(token_counts([(r.token_ids, r.prompt_len) for r in recs], self.info.vocab_size), c.draft_vocab_size)
            if self._engine is not None:
                raise RuntimeError("the draft vocabulary must be chosen before the learner's first step")
            self._drafter.set_draft_vocab(ids)
            self.state.extra["vocab"] = True
        self.teacher_refused = []
        self.teacher = [r for r in map(decode, list(data)[self.rank :: self.world]) if r is not None]
        if data and not self.teacher:
            raise DopdError(f"learner rank {self.rank}: every SFT record of its share was refused: {self.teacher_refused[-1]}")
        return len(self.teacher)

    def sft_step(self) -> dict:
        if not self.teacher:
            raise RuntimeError("sft_step before set_teacher")
        mb = self.cfg.learner.micro_batch_size
        recs = []
        while len(recs) < mb:
            order = np.random.default_rng([self.cfg.seed, self.rank, self.state.sft_epoch]).permutation(len(self.teacher))
            if self.state.sft_cursor >= len(order):
                self.state.sft_epoch += 1
                self.state.sft_cursor = 0
                continue
            recs.append(self.teacher[order[self.state.sft_cursor]])
            self.state.sft_cursor += 1
        out = self._train(make_batch(recs, self.cfg, "sft", self.rng, self.device), "sft")
        out["records"] = 0
        return out

    # --- weights and checkpoints ------------------------------------------------------------------------------
    def gather_weights(self) -> dict | None:
        """The full drafter state (ZeRO-3 aware: parameters are gathered on every rank); returned by rank 0 only."""
        module = self.drafter
        if self.cfg.learner.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy() for k, v in state.items()} if self.rank == 0 else None

    def save(self, directory: str, tag: str) -> bool:
        client = {"rank_state": self.state.__dict__, "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(directory, tag=tag, client_state=client)
        return True

    def load(self, directory: str, tag: str) -> int:
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client:
            self.state = RankState(**client["rank_state"])
            self.rng.bit_generator.state = client["rng"]
            torch.set_rng_state(client["torch_rng"])
        return self.state.step


class LearnerActor:
    """Ray wrapper: one rank; pulls its micro-batches from its own shard(s).

    A plain class at module level; dopd/fleet.py (LearnerGroup) applies `ray.remote` where it places the ranks, so
    importing this module never imports Ray.
    """

    def __init__(self, cfg_dict: dict, rank: int, world: int, shards: list, device: str):
        from dopd.common.config import config_from_dict

        torch.set_num_threads(max(1, int(os.environ.get("DOPD_LEARNER_THREADS", "1"))))
        self.cfg = config_from_dict(cfg_dict)
        self.shards = shards
        self.rank, self.world, self.device = rank, world, device
        self.rank_obj: LearnerRank | None = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's answer is the torch.distributed master."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def init(self, master_addr: str, master_port: int) -> int:
        self.rank_obj = LearnerRank(self.cfg, self.rank, self.world, master_addr, master_port, self.device)
        return self.rank

    def opd_step(self, learner_version: int, timeout_s: float = 600.0) -> dict:
        """Pull a micro-batch from this rank's shard(s) and train on it. Each record is decoded and validated here,
        once; a record that fails is reported back to its shard (counted there as rejected) and replaced by the
        next one, so no input can stop the rank. A shard's `get` waits inside the shard for records to arrive."""
        import ray

        need = self.cfg.learner.micro_batch_size
        recs: list[ExperienceRecord] = []
        t0 = time.perf_counter()
        i = 0
        while len(recs) < need:
            left = timeout_s - (time.perf_counter() - t0)
            if left <= 0:
                raise TimeoutError(f"learner waited {timeout_s:.0f}s for {need} records from its shard(s)")
            shard = self.shards[i % len(self.shards)]
            # one shard: wait for the whole micro-batch; several: a first pass that takes what is there, then turns
            wait = left if len(self.shards) == 1 else 0.0 if i < len(self.shards) else min(left, 0.5)
            i += 1
            refused = []
            for b in ray.get(shard.get.remote(need - len(recs), learner_version, wait)):
                try:
                    recs.append(self.rank_obj.decode(b))
                except RecordError as e:
                    refused.append(str(e))
            if refused:
                ray.get(shard.refused_by_learner.remote(refused))
        wait_s = time.perf_counter() - t0
        out = self.rank_obj.opd_step(recs, learner_version)
        out["wait_s"] = wait_s
        return out

    def set_teacher(self, box: list) -> int:
        import ray

        return self.rank_obj.set_teacher(ray.get(box[0]))

    def sft_step(self) -> dict:
        return self.rank_obj.sft_step()

    def gather_weights(self):
        return self.rank_obj.gather_weights()

    def save(self, directory: str, tag: str) -> bool:
        return self.rank_obj.save(directory, tag)

    def load(self, directory: str, tag: str) -> int:
        return self.rank_obj.load(directory, tag)

    def num_parameters(self) -> int:
        return self.rank_obj.drafter.num_parameters()

    def pid(self) -> int:
        return os.getpid()
