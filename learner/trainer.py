"""The in-process trainer (no Ray): SFT warm-up, then rounds of rollout + replay -> learner steps -> refresh.

One process plays both sides: a *policy* copy of the drafter rolls out and replays (actor side), the *learner*
drafter trains on the resulting experience records (encoded to the wire format and decoded again, exactly what
the distributed queue carries) and every `refresh_every` steps the policy copy takes the learner's weights and the
policy version goes up. A round rolls out `refresh_every * micro_batch_size` prompts, so each record is trained on
once, by the learner version right after the one that produced it (0 versions stale), as in the official code.

Learner FLOPs are counted by PyTorch's FlopCounterMode around every step's forward and backward (matmuls,
attention and convolutions: everything that scales with model size; elementwise ops are not counted). Rollout,
replay and evaluation are not learner FLOPs; their time is logged separately.

Checkpoints hold the drafter, the policy copy, optimizer and schedule, step, policy version, FLOPs, data cursors,
every RNG state and the records not yet trained on, so a resumed run computes the same next loss.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dopd.actors.replay import Replayer, choose_anchors
from dopd.actors.rollout import make_records, rollout
from dopd.actors.teacher import regenerate, teacher_records
from dopd.common.config import Config, dump_config
from dopd.common.drafters import Drafter, build_drafter, load_drafter, spec_for
from dopd.common.errors import DopdError
from dopd.common.evaluation import quick_tau
from dopd.common.models import Target, load_target
from dopd.common.prompts import Prompt, encode_all, load_prompt_set, split_prompts
from dopd.common.pypi import cache_dir
from dopd.common.record import (
    ExperienceRecord,
    TeacherRecord,
    decode_record,
    decode_teacher,
    encode_record,
    encode_teacher,
)
from dopd.common.specdec import DecodeSettings

from .batch import collate_records
from .objective import compute_loss
from .sft import sft_batch


@dataclass
class TrainState:
    step: int = 0
    policy_version: int = 0
    flops: float = 0.0
    round: int = 0
    seq_no: int = 0
    sft_epoch: int = 0
    sft_cursor: int = 0
    prompt_epoch: int = 0
    prompt_cursor: int = 0
    rollout_s: float = 0.0
    replay_s: float = 0.0
    learner_s: float = 0.0
    eval_s: float = 0.0
    rollout_tokens: int = 0
    replay_anchors: int = 0
    replay_tokens: int = 0
    extra: dict = field(default_factory=dict)


def make_optimizer(drafter: Drafter, cfg: Config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learner.lr, betas=tuple(cfg.learner.betas), weight_decay=cfg.learner.weight_decay)
    warm = max(cfg.learner.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


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


class Trainer:
    """SFT and Draft-OPD in one process. `run()` trains to the configured step / FLOP budget."""

    def __init__(self, cfg: Config, target: Target | None = None, resume: bool = False, log=print):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.target = target or load_target(cfg.model.target, cfg.model.device, cfg.model.dtype)
        self.device = self.target.device
        self._prepare_prompts()
        self.spec = spec_for(cfg.drafter, self.target.info, self.target.model.config)
        self._sft_data: list[TeacherRecord] | None = None
        self.drafter = self._build_drafter()
        self.policy = self._copy(self.drafter)
        self.opt, self.sched = make_optimizer(self.drafter, cfg)
        self.state = TrainState()
        self.buffer: list[bytes] = []
        self.replayer = Replayer(self.target, cfg.replay, cfg.rollout, batch_size=cfg.rollout.batch_size)
        self.metrics_path = self.out / "metrics.jsonl"
        if resume:
            self.load_checkpoint()
        else:
            for stale in ("metrics.jsonl", "opd_sequences.jsonl", "summary.json"):
                (self.out / stale).unlink(missing_ok=True)
        dump_config(cfg, self.out / "config.yaml")  # the config this run uses (a resume may add overrides)

    # --- setup ----------------------------------------------------------------------------------------------
    def _prepare_prompts(self) -> None:
        cfg = self.cfg
        prompts = load_prompt_set(cfg.data.prompts)
        if cfg.data.eval_prompts:
            train, evals = prompts, load_prompt_set(cfg.data.eval_prompts)[: cfg.data.num_eval]
            split = {"source": cfg.data.prompts, "eval_source": cfg.data.eval_prompts, "eval_ids": [p.id for p in evals]}
        else:
            sp = split_prompts(prompts, cfg.data.num_eval, cfg.data.seed, cfg.data.prompts)
            train, evals, split = sp.train, sp.eval, sp.describe()
        if cfg.data.num_train is not None:
            train = train[: cfg.data.num_train]
        tok = self.target.tokenizer
        self.train_ids, self.train_prompts = encode_all(tok, train, cfg.data.max_prompt_tokens, drop_long=True)
        self.eval_ids, self.eval_prompts = encode_all(tok, evals, cfg.data.max_prompt_tokens, drop_long=False)
        split["num_train_encoded"] = len(self.train_ids)
        (self.out / "split.json").write_text(json.dumps(split, indent=1))

    def _build_drafter(self) -> Drafter:
        cfg = self.cfg
        t = self.target
        counts = None
        if cfg.drafter.draft_vocab_size is not None and not cfg.drafter.init:
            counts = torch.zeros(t.info.vocab_size, dtype=torch.long)
            for r in self.sft_data():
                counts += torch.bincount(torch.from_numpy(r.token_ids[r.prompt_len :].astype(np.int64)), minlength=t.info.vocab_size)
        d = build_drafter(cfg.drafter, t.info, t.model.config, t.embed_tokens.weight, t.lm_head.weight, counts, seed=cfg.seed)
        return d.to(self.device).train()

    def _copy(self, d: Drafter) -> Drafter:
        c = type(d)(d.spec, d.embed_weight, d.head_weight, d.draft_ids)
        c.load_state_dict(d.state_dict())
        return c.to(self.device).eval().requires_grad_(False)

    # --- SFT data ---------------------------------------------------------------------------------------------
    def sft_data(self) -> list[TeacherRecord]:
        """Target-written, teacher-scored sequences (cached on disk by content)."""
        if self._sft_data is not None:
            return self._sft_data
        cfg, t = self.cfg, self.target
        if cfg.sft.sequences:
            items = read_sequences(cfg.sft.sequences)
            key_src = {"sequences": hashlib.sha256(Path(cfg.sft.sequences).read_bytes()).hexdigest()}
        else:
            n = len(self.train_ids) if cfg.sft.num_prompts is None else min(cfg.sft.num_prompts, len(self.train_ids))
            key_src = {
                "prompts": [p.id for p in self.train_prompts[:n]], "max_new": cfg.sft.max_new_tokens,
                "temperature": cfg.sft.temperature, "seed": cfg.seed,
            }  # fmt: skip
            items = None
        key_src.update(target=t.info.to_dict(), weights=t.fingerprint, layers=self.spec.feature_layers, topk=cfg.rollout.topk)
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_dir() / "sft" / key / "teacher.msgpack"
        if path.is_file():
            import msgpack

            self._sft_data = [decode_teacher(b) for b in msgpack.unpackb(path.read_bytes(), raw=False)]
            self.log(f"sft data: {len(self._sft_data)} cached sequences from {path.parent}")
            return self._sft_data
        t0 = time.perf_counter()
        if items is None:
            n = len(key_src["prompts"])
            self.log(f"sft data: the target answers {n} training prompts (cached after this run)")
            answers = regenerate(t, self.train_ids[:n], cfg.sft.max_new_tokens, cfg.sft.temperature, max(cfg.rollout.batch_size, 8), cfg.seed)
            items = [(p.id, ids + a, len(ids)) for p, ids, a in zip(self.train_prompts[:n], self.train_ids[:n], answers)]
        recs = teacher_records(t, self.spec.feature_layers, items, cfg.rollout.topk)
        import msgpack

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb([encode_teacher(r) for r in recs], use_bin_type=True))
        tmp.replace(path)
        self.log(f"sft data: {len(recs)} sequences in {time.perf_counter() - t0:.0f}s -> {path.parent}")
        self._sft_data = recs
        return recs

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
    def _next_prompts(self, n: int) -> tuple[list[list[int]], list[Prompt]]:
        ids, ps = [], []
        while len(ids) < n:
            order = np.random.default_rng(self.cfg.seed + 1000 + self.state.prompt_epoch).permutation(len(self.train_ids))
            if self.state.prompt_cursor >= len(order):
                self.state.prompt_epoch += 1
                self.state.prompt_cursor = 0
                continue
            j = order[self.state.prompt_cursor]
            ids.append(self.train_ids[j])
            ps.append(self.train_prompts[j])
            self.state.prompt_cursor += 1
        return ids, ps

    def collect(self) -> list[ExperienceRecord]:
        """One round on the actor side: rollout + replay with the policy copy -> records (wire bytes in buffer)."""
        cfg, st = self.cfg, self.state
        n = cfg.learner.refresh_every * cfg.learner.micro_batch_size
        ids, prompts = self._next_prompts(n)
        seed = cfg.seed * 100003 + st.round
        t0 = time.perf_counter()
        seqs, rst = rollout(self.target, self.policy, ids, cfg.rollout, seed)
        t1 = time.perf_counter()
        anchors = [choose_anchors(s, cfg.replay.anchors, self.policy.context_start() + 1, cfg.replay.max_anchors_per_seq, self.rng) for s in seqs]
        blocks, rep = self.replayer.replay(self.policy, seqs, anchors, seed)
        t2 = time.perf_counter()
        meta = {"round": st.round, "block_size": cfg.rollout.block_size, "temperature": cfg.rollout.temperature}
        recs = make_records(seqs, blocks, [p.id for p in prompts], st.policy_version, 0, 0, st.seq_no, meta)
        st.seq_no += len(recs)
        st.round += 1
        st.rollout_s += t1 - t0
        st.replay_s += t2 - t1
        st.rollout_tokens += rst.new_tokens
        st.replay_anchors += rep.anchors
        st.replay_tokens += rep.tokens_scored
        self.buffer.extend(encode_record(r) for r in recs)
        with open(self.out / "opd_sequences.jsonl", "a") as f:
            for r in recs:
                f.write(json.dumps({"prompt_id": r.prompt_id, "token_ids": r.token_ids.tolist(), "prompt_len": r.prompt_len, "policy_version": r.policy_version}) + "\n")
        self._log({
            "event": "rollout", "round": st.round - 1, "policy_version": st.policy_version, "rollout_tau": rst.tau,
            "rollout_alpha": rst.alpha, "rollout_tokens": rst.new_tokens, "rollout_s": t1 - t0,
            "rollout_tokens_per_s": rst.new_tokens / max(t1 - t0, 1e-9), "replay_anchors": rep.anchors,
            "replay_s": t2 - t1, "replay_anchors_per_s": rep.anchors / max(t2 - t1, 1e-9),
        })  # fmt: skip
        return recs

    # --- learner --------------------------------------------------------------------------------------------
    def learner_step(self, phase: str) -> dict:
        cfg, st = self.cfg, self.state
        mb = cfg.learner.micro_batch_size
        if phase == "sft":
            batch = sft_batch(self._next_sft(mb), cfg, self.rng, self.device)
            mode = "sft"
        else:
            if st.step == self.warmup_steps() and not self.buffer and st.round == 0:
                self.refresh_policy()  # the first on-policy round rolls out the warmed-up drafter
            if len(self.buffer) < mb:
                self.collect()
            recs = [decode_record(b) for b in self.buffer[:mb]]
            del self.buffer[:mb]
            batch = collate_records(recs, self.device)
            mode = "opd"
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as fc:
            parts = compute_loss(self.drafter, batch, cfg.loss, mode)
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
            "positions": batch.num_positions,
        }  # fmt: skip
        self._log(row)
        if phase == "opd" and (st.step - self.warmup_steps()) % cfg.learner.refresh_every == 0:
            self.refresh_policy()
        return row

    def refresh_policy(self) -> None:
        self.policy.load_state_dict(self.drafter.state_dict())
        self.state.policy_version += 1

    def evaluate(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        settings = DecodeSettings(
            block_size=cfg.eval_block_size, temperature=cfg.eval.temperature, max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.rollout.batch_size, seed=cfg.seed,
        )  # fmt: skip
        ids = self.eval_ids[: cfg.eval.num_prompts]
        st = quick_tau(self.target, self.drafter, ids, settings)
        self.state.eval_s += time.perf_counter() - t0
        row = {"event": "eval", "step": self.state.step, "flops": self.state.flops, "tau": st.tau, "alpha": st.alpha, "eval_tokens_per_s": st.tokens_per_s}
        self._log(row)
        return row

    def _log(self, row: dict) -> None:
        row = {"time": time.time(), **row}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["event"] == "eval":
            self.log(f"[step {row['step']}] held-out tau {row['tau']:.3f}  alpha {' '.join(f'{a:.2f}' for a in row['alpha'])}  flops {row['flops']:.3g}")
        elif row["event"] == "step" and (row["step"] % 10 == 0 or row["step"] == 1):
            self.log(f"[step {row['step']}] {row['phase']} loss {row['loss']:.4f}  flops {row['flops']:.3g}")
        elif row["event"] == "rollout":
            self.log(f"[round {row['round']}] rollout tau {row['rollout_tau']:.3f}  {row['rollout_tokens_per_s']:.1f} tok/s  replay {row['replay_anchors']} anchors")

    # --- the loop -------------------------------------------------------------------------------------------
    def warmup_steps(self) -> int:
        return 0 if self.cfg.mode == "sft" else self.cfg.sft.warmup_steps

    def phase_for(self, step: int) -> str:
        return "sft" if self.cfg.mode == "sft" or step < self.cfg.sft.warmup_steps else "opd"

    def total_steps(self) -> int:
        c = self.cfg
        return self.warmup_steps() + c.learner.steps

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
            if s % c.eval_every == 0:
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
        return summary

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        d = self.out / "checkpoints" / f"step_{self.state.step:07d}"
        tmp = d.with_name(d.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.drafter.save_pretrained(tmp / "drafter")
        torch.save(
            {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "state": asdict(self.state),
                "policy": self.policy.state_dict(),
                "buffer": list(self.buffer),
                "rng": {"torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state, "python": random.getstate()},
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
        self.policy.load_state_dict(blob["policy"])
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])
        self.state = TrainState(**blob["state"])
        self.buffer = list(blob["buffer"])
        torch.set_rng_state(blob["rng"]["torch"])
        self.rng.bit_generator.state = blob["rng"]["numpy"]
        random.setstate(blob["rng"]["python"])
        self.log(f"resumed from {path} at step {self.state.step}, policy version {self.state.policy_version}")


def resume_config(out_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a run was started with (from its latest checkpoint), with optional overrides on top."""
    from dopd.common.config import _set_path, _build  # noqa: PLC0415  (same typed loader)

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


__all__ = ["Trainer", "TrainState", "make_optimizer", "resume_config"]
