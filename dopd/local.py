"""The in-process runner (no Ray): SFT warm-up, then rounds of rollout -> learner steps -> refresh, in one process.

It plays both sides with the same pieces the distributed job places on Ray: a `RolloutWorker` (the actor side: a
policy copy of the drafter and the shared recipe `ExperienceMaker`) turns prompts into experience records, which
are encoded to the wire format and decoded again (exactly what the queue carries), and the learner side trains on
them with the shared batch/loss (`learner/objective.py`) and optimizer (`learner/optim.py`). Every
`refresh_every` steps the policy copy takes the learner's weights and the policy version goes up; a round rolls out
`refresh_every * micro_batch_size` prompts, so each record is trained on once, by the learner version right after
the one that produced it (0 versions stale), as in the official code.

Learner FLOPs are counted by PyTorch's FlopCounterMode around every step's forward and backward (matmuls,
attention and convolutions: everything that scales with model size; elementwise ops are not counted). Rollout
and evaluation are not learner FLOPs; their time is logged separately.

Checkpoints hold the drafter, the policy copy, optimizer and schedule, step, policy version, FLOPs, data cursors,
every RNG state and the records not yet trained on, so a resumed run computes the same next loss.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dopd.actors.actor import RolloutWorker
from dopd.common.config import Config, dump_config
from dopd.common.drafters import Drafter, build_drafter, load_drafter, spec_for, token_counts
from dopd.common.errors import DopdError
from dopd.common.models import Target, load_target
from dopd.common.prompts import run_prompts
from dopd.common.record import ExperienceRecord, TeacherRecord, decode_record
from dopd.common.sinks import RowMetrics
from dopd.learner.objective import compute_loss, make_batch
from dopd.learner.optim import make_optimizer


@dataclass
class TrainState:
    step: int = 0
    origin: int = 0  # the step this run started from (a branch: its warm-up's step); eval_every counts from it
    policy_version: int = 0
    flops: float = 0.0
    round: int = 0
    sft_epoch: int = 0
    sft_cursor: int = 0
    rollout_s: float = 0.0
    replay_s: float = 0.0
    learner_s: float = 0.0
    eval_s: float = 0.0
    rollout_tokens: int = 0
    replay_anchors: int = 0
    worker: dict = field(default_factory=dict)  # the rollout worker's cursors (prompt order, sequence numbers)
    extra: dict = field(default_factory=dict)


def read_sequences(path: str) -> list[tuple[str, list[int], int]]:
    """(prompt_id, token_ids, prompt_len) per line of a sequences JSONL (as written by an OPD run)."""
    p = Path(path)
    if not p.is_file():
        raise DopdError(f"sft.sequences file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                out.append((str(row["prompt_id"]), [int(x) for x in row["token_ids"]], int(row["prompt_len"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DopdError(f"{p}:{i}: expected {{prompt_id, token_ids, prompt_len}}") from None
    if not out:
        raise DopdError(f"sft.sequences file {p} is empty")
    return out


def branch_from(checkpoint: Path, out: Path) -> None:
    """Make `out` a fresh run directory whose latest checkpoint is a copy of `checkpoint` (another run's): a
    `Trainer(..., resume=True)` there continues from it. Experiments branch every arm from one warm-up this way."""
    if out.exists():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    blob_path = out / "checkpoints" / checkpoint.name / "trainer_state.pt"
    blob = torch.load(blob_path, weights_only=False)
    blob["state"]["origin"] = blob["state"]["step"]  # the branch's evaluations count from here (`TrainState.origin`)
    torch.save(blob, blob_path)
    (out / "checkpoints" / "latest").write_text(checkpoint.name)


_WORKER_KEYS = ("seq_no", "batch_no", "cursor", "epoch")


class Trainer:
    """SFT and Draft-OPD in one process. `run()` trains to the configured step / FLOP budget."""

    def __init__(self, cfg: Config, target: Target | None = None, resume: bool = False, log=print):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.target = target or load_target(cfg.model.target, cfg.model.device, cfg.model.dtype, forward=cfg.model.forward)
        self.device = self.target.device
        self._prepare_prompts()
        self.spec = spec_for(cfg.drafter, self.target.info, self.target.model.config)
        # the actor side: the same worker a Ray rollout actor wraps (incarnation 0: one process, never restarted)
        self.worker = RolloutWorker(cfg, 0, self.rollout_prompts, incarnation=0, target=self.target, log=log)
        self._sft_data: list[TeacherRecord] | None = None
        self.drafter = self._build_drafter()
        self.opt, self.sched = make_optimizer(self.drafter, cfg)
        self.state = TrainState()
        self.buffer: list[bytes] = []
        self.metrics_path = self.out / "metrics.jsonl"
        self.refresh_policy(version=0)
        if resume:
            self.load_checkpoint()
        else:
            for stale in ("metrics.jsonl", "opd_sequences.jsonl", "summary.json"):
                (self.out / stale).unlink(missing_ok=True)
        dump_config(cfg, self.out / "config.yaml")  # the config this run uses (a resume may add overrides)
        self.sinks = RowMetrics.for_config(cfg, lambda: self.state, fresh=not resume)  # TensorBoard / W&B, when on

    @property
    def policy(self) -> Drafter:
        """The rollout copy of the drafter (weights as of the last refresh)."""
        return self.worker.drafter

    # --- setup ----------------------------------------------------------------------------------------------
    def _prepare_prompts(self) -> None:
        p = run_prompts(self.cfg, self.target.tokenizer)
        self.train, self.sft_prompts, self.rollout_prompts, self.eval_ids = p.train, p.sft, p.rollout, p.eval_ids
        (self.out / "split.json").write_text(json.dumps(p.split, indent=1))
        self.log(p.summary())

    def _build_drafter(self) -> Drafter:
        cfg = self.cfg
        t = self.target
        counts = None
        if cfg.drafter.draft_vocab_size is not None and not cfg.drafter.init:
            counts = token_counts([(r.token_ids, r.prompt_len) for r in self.sft_data()], t.info.vocab_size)
        d = build_drafter(cfg.drafter, t.info, t.model.config, t.embed_tokens.weight, t.lm_head.weight, counts, seed=cfg.seed)
        return d.to(self.device).train()

    # --- SFT data ---------------------------------------------------------------------------------------------
    def sft_data(self) -> list[TeacherRecord]:
        """Target-written, teacher-scored sequences (cached on disk), or `sft.sequences` scored by the target."""
        if self._sft_data is not None:
            return self._sft_data
        cfg = self.cfg
        if cfg.sft.sequences:
            from dopd.common.greedy import prefill

            items = read_sequences(cfg.sft.sequences)
            self._sft_data = prefill(self.target, self.spec.feature_layers, items, cfg.rollout.topk, feature_dtype=torch.bfloat16)
        else:
            self._sft_data = self.worker.maker.teacher(self.spec.feature_layers, self.sft_prompts)
        return self._sft_data

    def _next_sft(self, n: int) -> list[TeacherRecord]:
        data = self.sft_data()
        out = []
        while len(out) < n:
            order = np.random.default_rng(self.cfg.seed + self.state.sft_epoch).permutation(len(data))
            if self.state.sft_cursor >= len(data):
                self.state.sft_epoch += 1
                self.state.sft_cursor = 0
                continue
            out.append(data[order[self.state.sft_cursor]])
            self.state.sft_cursor += 1
        return out

    # --- on-policy experience ---------------------------------------------------------------------------------
    def collect(self) -> list[ExperienceRecord]:
        """One round on the actor side: the worker rolls out refresh_every x micro_batch prompts -> wire bytes."""
        cfg, st = self.cfg, self.state
        n = cfg.learner.refresh_every * cfg.learner.micro_batch_size
        data, stats = self.worker.produce(n)
        st.round += 1
        st.rollout_s += stats["rollout_s"]
        st.replay_s += stats["replay_s"]
        st.rollout_tokens += stats["tokens"]
        st.replay_anchors += stats["anchors"]
        self.buffer.extend(data)
        recs = [decode_record(b) for b in data]
        with open(self.out / "opd_sequences.jsonl", "a") as f:
            for r in recs:
                f.write(json.dumps({"prompt_id": r.prompt_id, "token_ids": r.token_ids.tolist(), "prompt_len": r.prompt_len, "policy_version": r.policy_version}) + "\n")
        self._log({
            "event": "rollout", "round": st.round - 1, "policy_version": st.policy_version, "rollout_tau": stats["tau"],
            "rollout_alpha": stats["alpha"], "rollout_tokens": stats["tokens"], "rollout_s": stats["rollout_s"],
            "rollout_tokens_per_s": stats["tokens"] / max(stats["rollout_s"], 1e-9), "replay_anchors": stats["anchors"],
            "replay_s": stats["replay_s"], "path": stats["path"],
        })  # fmt: skip
        return recs

    # --- learner --------------------------------------------------------------------------------------------
    def learner_step(self, phase: str) -> dict:
        cfg, st = self.cfg, self.state
        mb = cfg.learner.micro_batch_size
        if phase == "sft":
            batch = make_batch(self._next_sft(mb), cfg, "sft", self.rng, self.device)
        else:
            if st.step == self.warmup_steps() and not self.buffer and st.round == 0:
                self.refresh_policy()  # the first on-policy round rolls out the warmed-up drafter
            if len(self.buffer) < mb:
                self.collect()
            recs = [decode_record(b) for b in self.buffer[:mb]]
            del self.buffer[:mb]
            batch = make_batch(recs, cfg, "opd", self.rng, self.device)
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as fc:
            parts = compute_loss(self.drafter, batch, cfg, phase, step=st.step)
            parts.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for p in self.drafter.parameters() if p.requires_grad], cfg.learner.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        st.learner_s += time.perf_counter() - t0
        st.step += 1
        st.flops += fc.get_total_flops()
        row = {
            "event": "step", "step": st.step, "phase": phase, "loss": float(parts.loss.detach()), "acc_div": parts.acc,
            "rej_div": parts.rej, "n_acc": parts.n_acc, "n_rej": parts.n_rej, "grad_norm": float(gnorm),
            "lr": self.sched.get_last_lr()[0], "flops": st.flops, "policy_version": st.policy_version,
            "positions": batch.num_positions, **({"dvi_phase": parts.phase} if parts.phase else {}),
        }  # fmt: skip
        self._log(row)
        if phase == "opd" and (st.step - self.warmup_steps()) % cfg.learner.refresh_every == 0:
            self.refresh_policy()
        return row

    def refresh_policy(self, version: int | None = None) -> None:
        """Publish the learner's weights to the rollout copy (version + 1, or the given version)."""
        self.state.policy_version = self.state.policy_version + 1 if version is None else version
        self.worker.set_weights({k: v.detach().clone() for k, v in self.drafter.state_dict().items()}, self.state.policy_version)

    def evaluate(self) -> dict:
        t0 = time.perf_counter()
        res = self.worker.maker.evaluate(self.drafter, self.eval_ids[: self.cfg.eval.num_prompts])
        self.state.eval_s += time.perf_counter() - t0
        st = self.state
        row = {"event": "eval", "step": st.step, "flops": st.flops, "train_s": st.rollout_s + st.replay_s + st.learner_s, **res}
        self._log(row)
        return row

    def _log(self, row: dict) -> None:
        row = {"time": time.time(), **row}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.sinks is not None:
            self.sinks.observe(row)
        if row["event"] == "eval":
            self.log(f"[step {row['step']}] held-out tau {row['tau']:.3f} ({row['steps']} steps{', simulated' if row['simulated'] else ''})  alpha {' '.join(f'{a:.2f}' for a in row['alpha'])}  flops {row['flops']:.3g}")
        elif row["event"] == "step" and (row["step"] % 10 == 0 or row["step"] == 1):
            self.log(f"[step {row['step']}] {row['phase']} loss {row['loss']:.4f}  flops {row['flops']:.3g}")
        elif row["event"] == "rollout":
            self.log(f"[round {row['round']}] rollout tau {row['rollout_tau']:.3f} ({row['path']})  {row['rollout_tokens_per_s']:.1f} tok/s  replay {row['replay_anchors']} anchors")

    # --- the loop -------------------------------------------------------------------------------------------
    def warmup_steps(self) -> int:
        return 0 if self.cfg.mode == "sft" else self.cfg.sft.warmup_steps

    def phase_for(self, step: int) -> str:
        return "sft" if self.cfg.mode == "sft" or step < self.cfg.sft.warmup_steps else "opd"

    def total_steps(self) -> int:
        return self.warmup_steps() + self.cfg.learner.steps

    def done(self) -> bool:
        b = self.cfg.learner.flops_budget
        return self.state.step >= self.total_steps() or (b is not None and self.state.flops >= b)

    def run(self) -> dict:
        c = self.cfg.learner
        last_eval = None
        if self.state.step == 0:
            last_eval = self.evaluate()
        while not self.done():
            self.learner_step(self.phase_for(self.state.step))
            s = self.state.step
            if (s - self.state.origin) % c.eval_every == 0:
                last_eval = self.evaluate()
            if s % c.checkpoint_every == 0:
                self.save_checkpoint()
        if last_eval is None or last_eval["step"] != self.state.step:
            last_eval = self.evaluate()
        self.save_checkpoint()
        self.drafter.save_pretrained(self.out / "drafter")
        summary = {
            "steps": self.state.step, "flops": self.state.flops, "tau": last_eval["tau"], "alpha": last_eval["alpha"],
            "target": self.target.info.to_dict(), "drafter_params": self.drafter.num_parameters(), "state": asdict(self.state),
        }  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None
        return summary

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        d = self.out / "checkpoints" / f"step_{self.state.step:07d}"
        tmp = d.with_name(d.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.drafter.save_pretrained(tmp / "drafter")
        self.state.worker = {k: getattr(self.worker, k) for k in _WORKER_KEYS}
        torch.save(
            {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "state": asdict(self.state),
                "policy": self.policy.state_dict(),
                "buffer": list(self.buffer),
                "rng": {
                    "torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state, "python": random.getstate(),
                    "worker": self.worker.rng.bit_generator.state,
                },  # fmt: skip
                "config": self.cfg.to_dict(),
                "target": self.target.info.to_dict(),
            },
            tmp / "trainer_state.pt",
        )
        if d.exists():
            shutil.rmtree(d)
        tmp.replace(d)
        (self.out / "checkpoints" / "latest").write_text(d.name)
        return d

    def load_checkpoint(self, path: Path | None = None) -> None:
        root = self.out / "checkpoints"
        if path is None:
            latest = root / "latest"
            if not latest.is_file():
                raise DopdError(f"nothing to resume in {self.out}: no checkpoints/latest")
            path = root / latest.read_text().strip()
        blob = torch.load(path / "trainer_state.pt", weights_only=False)
        loaded = load_drafter(path / "drafter", self.target.info, self.drafter.embed_weight, self.drafter.head_weight)
        self.drafter.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])
        self.state = TrainState(**blob["state"])
        self.worker.set_weights(blob["policy"], self.state.policy_version)
        for k, v in self.state.worker.items():
            setattr(self.worker, k, v)
        self.buffer = list(blob["buffer"])
        torch.set_rng_state(blob["rng"]["torch"])
        self.rng.bit_generator.state = blob["rng"]["numpy"]
        random.setstate(blob["rng"]["python"])
        if "worker" in blob["rng"]:
            self.worker.rng.bit_generator.state = blob["rng"]["worker"]
        self.log(f"resumed from {path} at step {self.state.step}, policy version {self.state.policy_version}")


def resume_config(out_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with (from its latest checkpoint), with optional overrides on top."""
    from dopd.common.config import _build, _set_path  # noqa: PLC0415  (same typed loader)

    root = Path(out_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        raise DopdError(f"nothing to resume in {out_dir}: no checkpoints/latest")
    blob = torch.load(root / latest.read_text().strip() / "trainer_state.pt", weights_only=False)
    tree = blob["config"]
    for ov in overrides or []:
        if "=" not in ov:
            raise DopdError(f"override '{ov}' must look like section.key=value")
        k, v = ov.split("=", 1)
        _set_path(tree, k.strip(), v.strip())
    cfg = _build(Config, tree, "").validate()
    cfg.out_dir = str(out_dir)
    return cfg


__all__ = ["Trainer", "TrainState", "read_sequences", "resume_config"]
