"""The distributed job: N rollout actors -> S queue shards -> M ZeRO learner ranks -> new weights -> actors.

`DistributedJob.run` is the algorithm top to bottom: place the pieces (a placement group on the Ray cluster, or an
embedded local Ray), SFT warm-up, then Draft-OPD steps with the learner group in lockstep (each step every rank
pulls a micro-batch from its own shard), publishing weights every `refresh_every` steps, checkpoints and held-out
evaluations. The groups (dopd/fleet.py: `RolloutFleet`, `LearnerGroup`) own placement, fan-out and recovery (a
killed actor is restarted by Ray; the fleet sees the new incarnation, re-sends the current weights and restarts its
loop). The driver serves the job's /metrics endpoint and keeps the accounts: every trained record's (actor,
incarnation, seq) goes into a bounded ledger (dopd/exactly_once.py) saved in every checkpoint, so
`records_trained_twice` counts any record delivered twice, and every record offered to the queues ends up trained,
dropped (by reason), rejected, lost in flight at a crash, or still queued.

A learner crash cannot be repaired inside the job (its torch.distributed group is gone): the job stops and
`dopd train --resume DIR` continues from the last checkpoint (DeepSpeed ZeRO state + step + policy version +
accounting). Records in the queues at the crash are lost, never duplicated: the resumed actors are new
incarnations. The crashing job writes checkpoints/crash.json (its counters and what was still queued) so the
resumed job's accounts still add up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dopd.common.config import Config, dump_config
from dopd.common.errors import DopdError
from dopd.common.metrics import JobMetrics
from dopd.common.sinks import make_sinks
from dopd.connection import cluster_address, connect
from dopd.exactly_once import TrainedLedger
from dopd.fleet import LearnerGroup, LearnerLost, RolloutFleet, make_shards

@dataclass
class JobState:
    step: int = 0
    policy_version: int = 0
    flops: float = 0.0
    records_consumed: int = 0  # records in learner steps (SFT teacher records + queue records)
    records_trained: int = 0  # queue records trained on (what the ledger holds)
    records_trained_twice: int = 0
    actor_restarts: int = 0
    resumes: int = 0
    lost_queued: int = 0  # records still in the queues when a job crashed (the shards die with it)
    base: dict = field(default_factory=dict)  # shard counts carried over from before a resume
    ledger: list = field(default_factory=list)  # the exactly-once ledger (dopd/exactly_once.py), in checkpoints only
    history: list = field(default_factory=list)  # held-out evaluations


class DistributedJob:
    """Build with a config, then `run()`. `hooks['on_step'](job, step)` runs after every learner step (tests)."""

    def __init__(self, cfg: Config, resume: bool = False, hooks: dict[str, Callable] | None = None, log=print):
        self.cfg = cfg
        self.resume = resume
        self.hooks = hooks or {}
        self.log = log
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = JobState()
        self.metrics = JobMetrics()
        self.fleet: RolloutFleet | None = None
        self.learners: LearnerGroup | None = None
        self.shards: list = []
        self.ledger = TrainedLedger()
        self.actor_totals: dict[tuple[int, int], dict] = {}
        self.shard_seen: dict[tuple[str, str], int] = {}
        self.prom_target: str | None = None
        self.ray_mode = ""
        self.pg = None

    # --- the job --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        t_start = time.time()
        c = self.cfg
        if not self.resume:
            for stale in ("metrics.jsonl", "run_summary.json"):
                (self.out / stale).unlink(missing_ok=True)
        dump_config(c, self.out / "config.yaml")
        mode = self.ray_mode = connect(c)
        self.log(f"dopd: Ray {'(embedded, local)' if mode == 'embedded' else mode}; {c.cluster.actors} actors, {c.cluster.learners} learner ranks (ZeRO-{c.learner.zero_stage})")
        self._prompts()
        try:
            self._place()
            self._serve_metrics()
            if self.resume:
                self._restore()
            self.metrics.attach(make_sinks(c, fresh=not self.resume, step=self.state.step), step=lambda: self.state.step)
            warm = c.sft.warmup_steps if c.mode == "opd" else c.learner.steps
            total = warm + c.learner.steps if c.mode == "opd" else c.learner.steps
            pbar = tqdm(total=total, initial=self.state.step, desc="learner steps", disable=not sys.stderr.isatty())
            if self.state.step < warm:
                self._sft_warmup(warm, pbar)
                self.state.policy_version += 1
            if c.mode == "opd":
                self._publish()
                self.fleet.start()
                if not self.state.history:
                    self._eval()
                while self.state.step < total:
                    res = self.learners.opd_step(self.state.policy_version, wait=self._watch_actors)
                    self._after_step(res, "opd", pbar)
                    if (self.state.step - warm) % c.learner.refresh_every == 0:
                        self.state.policy_version += 1
                        self._publish()
                    self._watch_actors()
                    self._shard_stats()
                    if self.state.step % c.learner.eval_every == 0:
                        self._eval()
                    if self.state.step % c.learner.checkpoint_every == 0:
                        self._checkpoint()
                    if "on_step" in self.hooks:
                        self.hooks["on_step"](self, self.state.step)
                self.fleet.stop()
            if not self.state.history or self.state.history[-1]["step"] != self.state.step:
                if c.mode == "sft":
                    self._publish()
                self._eval()
            self._checkpoint()
            self._save_drafter()
            pbar.close()
            summary = self._summary(time.time() - t_start)
            (self.out / "run_summary.json").write_text(json.dumps(summary, indent=1))
            if c.metrics.enabled and c.metrics.linger_s > 0:
                self._check_actors_safe()
                time.sleep(c.metrics.linger_s)
            return summary
        except LearnerLost as e:
            self._record_crash()
            raise DopdError(f"{e}; continue with: dopd train --resume {self.out}") from None
        except BaseException:
            self._record_crash()
            raise
        finally:
            self.shutdown()

    # --- setup ----------------------------------------------------------------------------------------------
    def _prompts(self):
        from transformers import AutoTokenizer

        from dopd.common.models import load_target_info, resolve_target
        from dopd.common.prompts import run_prompts

        c = self.cfg
        tok = AutoTokenizer.from_pretrained(resolve_target(c.model.target, quiet=True))
        self.target_info = load_target_info(c.model.target).to_dict()
        p = run_prompts(c, tok)
        self.log(p.summary())
        if not c.data.eval_prompts:
            (self.out / "split.json").write_text(json.dumps(p.split, indent=1))
        self.train, self.sft_prompts, self.rollout_prompts = p.train, p.sft, p.rollout
        self.eval_ids = p.eval_ids[: c.eval.num_prompts]

    def _place(self):
        """One placement group (actor bundles first, then learner bundles if learners ask for resources), the
        queue shards, the learner group, then the rollout fleet."""
        from ray.util.placement_group import placement_group

        c = self.cfg.cluster
        N, M = c.actors, c.learners
        name = self.name = f"{self.out.name}-{os.getpid()}"
        bundles = [{"CPU": c.actor_num_cpus, "GPU": c.actor_num_gpus} for _ in range(N)]
        lb = {"CPU": c.learner_num_cpus, "GPU": c.learner_num_gpus}
        has_learner_bundle = any(v > 0 for v in lb.values())
        if has_learner_bundle:
            bundles += [lb for _ in range(M)]
        bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.001} for b in bundles]
        self.pg = placement_group(bundles, strategy="PACK", name=f"dopd-{name}")
        if not self.pg.wait(timeout_seconds=c.placement_timeout_s):
            raise DopdError(f"the cluster cannot place {N} actors and {M} learners with these resources: {bundles} (see `dopd cluster status`)")
        self.shards = make_shards(self.cfg, name)
        self.learners = LearnerGroup(self.cfg, name, self.pg, self.shards, N if has_learner_bundle else None)
        self.fleet = RolloutFleet(self.cfg, name, self.pg, self.shards, self.rollout_prompts, log=self.log, on_restart=self._on_actor_restart)

    def _serve_metrics(self):
        m = self.cfg.metrics
        if not m.enabled:
            return
        # every labelled series exists from the start (at 0), so rates and "no restarts yet" are data, not gaps
        for i in range(len(self.fleet)):
            for name in ("dopd_actor_restarts", "dopd_records_produced", "dopd_rollout_tokens", "dopd_replay_anchors"):
                self.metrics[name].labels(actor=str(i))
        for sh in range(len(self.shards)):
            for name in ("dopd_records_rejected", "dopd_records_dropped_stale", "dopd_records_dropped_full"):
                self.metrics[name].labels(shard=str(sh))
            self.metrics["dopd_queue_depth"].labels(shard=str(sh)).set(0)
            self.metrics["dopd_queue_bytes"].labels(shard=str(sh)).set(0)
        port = self.metrics.serve(m.host, m.port)
        self.metrics_port = port
        try:
            from dopd.prometheus import register_job_target

            self.prom_target = self.name
            register_job_target(self.name, m.host if m.host != "0.0.0.0" else "127.0.0.1", port, {"run": self.out.name})
        except ImportError:
            pass
        self.log(f"dopd: metrics on http://{m.host}:{port}/metrics")

    # --- phases ---------------------------------------------------------------------------------------------
    def _sft_warmup(self, total_warm: int, pbar) -> None:
        c = self.cfg
        n = len(self.sft_prompts)
        self.log(f"dopd: SFT warm-up data: the target answers {n} prompts, split over {len(self.fleet)} rollout actors")
        self.learners.set_teacher(self.fleet.teacher_data(self.sft_prompts))
        while self.state.step < total_warm:
            self._after_step(self.learners.sft_step(), "sft", pbar)

    def _publish(self) -> None:
        t0 = time.perf_counter()
        latency = self.learners.publish(self.fleet, self.state.policy_version)
        self.metrics["dopd_publish_latency_seconds"].observe(latency)
        self.metrics["dopd_policy_version"].set(self.state.policy_version)
        self.log_debug(f"published policy version {self.state.policy_version} in {time.perf_counter() - t0:.2f}s")

    def _eval(self) -> dict:
        res = self.fleet.evaluate(self.eval_ids)
        res["step"] = self.state.step
        self.log(f"dopd: step {self.state.step}: held-out tau {res['tau']:.3f} over {res.get('steps', '?')} verification steps" + (" (simulated from the cached greedy text)" if res.get("simulated") else ""))
        self.state.history.append(res)
        self.metrics.heldout(res["tau"], res["alpha"])
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "eval", "time": time.time(), **res}) + "\n")
        return res

    def _after_step(self, res: list[dict], phase: str, pbar) -> None:
        st = self.state
        st.step += 1
        flops = sum(r["flops"] for r in res)
        st.flops += flops
        records = sum(r["records"] for r in res)
        st.records_consumed += records
        staleness = []
        for r in res:
            for uid in r.get("uids", []):
                st.records_trained += 1
                if not self.ledger.add(uid):
                    st.records_trained_twice += 1
            staleness += r.get("staleness", [])
        n = len(res)
        loss = sum(r["loss"] for r in res) / n
        self.metrics.learner(loss, sum(r["acc"] for r in res) / n, sum(r["rej"] for r in res) / n, max(r["grad_norm"] for r in res), max(r["seconds"] for r in res), flops, records, staleness)
        row = {"event": "step", "time": time.time(), "step": st.step, "phase": phase, "loss": loss, "flops": st.flops, "policy_version": st.policy_version, "records": records, "staleness": staleness}
        dvi_phases = sorted({r["dvi_phase"] for r in res if "dvi_phase" in r})
        if dvi_phases:  # DVI's schedule phase of this step (every rank computes it from the same step count)
            row["dvi_phase"] = "/".join(dvi_phases)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss:.3f}", v=st.policy_version, tau=f"{st.history[-1]['tau']:.2f}" if st.history else "-")
            if pbar.disable and (st.step % 10 == 0 or st.step == pbar.total):  # not a terminal: a line now and then
                self.log(f"dopd: step {st.step}/{pbar.total} {phase} loss {loss:.3f} policy v{st.policy_version}" + (f" held-out tau {st.history[-1]['tau']:.3f}" if st.history else ""))

    # --- watching -------------------------------------------------------------------------------------------
    def log_debug(self, msg: str) -> None:
        if os.environ.get("DOPD_DEBUG"):
            self.log(msg)

    def _on_actor_restart(self, i: int) -> None:
        self.state.actor_restarts += 1
        self.metrics["dopd_actor_restarts"].labels(actor=str(i)).inc()

    def _watch_actors(self) -> None:
        """Recover dead actors (the fleet) and turn their counters into rollout metrics."""
        for i, st in self.fleet.check():
            key = (i, st["incarnation"])
            prev = self.actor_totals.get(key, {"tokens": 0, "anchors": 0, "records": 0, "batches": 0})
            tot, last = st["totals"], st["last"]
            if tot["batches"] > prev["batches"] and last:
                self.metrics.rollout(
                    str(i), last["tau"], last["alpha"], tot["tokens"] - prev["tokens"], last["rollout_s"],
                    tot["anchors"] - prev["anchors"], last["replay_s"], tot["records"] - prev["records"],
                )  # fmt: skip
            self.actor_totals[key] = dict(tot)

    def _shard_stats(self) -> list[dict]:
        import ray

        stats = ray.get([s.get_stats.remote() for s in self.shards])
        for st in stats:
            sid = str(st["shard"])
            self.metrics["dopd_queue_depth"].labels(shard=sid).set(st["depth"])
            self.metrics["dopd_queue_bytes"].labels(shard=sid).set(st["bytes"])
            for key, name in (("dropped_stale", "dopd_records_dropped_stale"), ("dropped_full", "dopd_records_dropped_full"), ("rejected", "dopd_records_rejected")):
                delta = st[key] - self.shard_seen.get((sid, key), 0)
                if delta > 0:
                    self.metrics[name].labels(shard=sid).inc(delta)
                self.shard_seen[(sid, key)] = st[key]
        self._last_shards = stats
        return stats

    def _check_actors_safe(self):
        try:
            self._shard_stats()
        except Exception:
            pass

    # --- checkpoints and accounting -------------------------------------------------------------------------
    _COUNT_KEYS = ("accepted", "rejected", "dropped_stale", "dropped_full", "delivered")

    def _totals(self, shards: list[dict]) -> dict:
        """Shard counters since the first job of this run (this job's shards + what earlier jobs carried over)."""
        return {k: self.state.base.get(k, 0) + sum(s[k] for s in shards) for k in self._COUNT_KEYS}

    def _checkpoint(self) -> None:
        """DeepSpeed ZeRO state on every rank + the driver's step, version and exactly-once ledger (bounded)."""
        root = self.out / "checkpoints"
        tag = f"step_{self.state.step:07d}"
        self.learners.save(str(root), tag)
        blob = asdict(self.state)
        blob["ledger"] = self.ledger.to_json()
        blob["base"] = self._totals(self._shard_stats())
        (root / tag).mkdir(parents=True, exist_ok=True)
        (root / tag / "job_state.json").write_text(json.dumps(blob))
        (root / "latest").write_text(tag)

    def _record_crash(self) -> None:
        """What a crash loses: the shards die with the job, so the records still queued are lost in flight (and so
        are records delivered after the last checkpoint: the resumed learners restart from it). Written next to
        the checkpoints; the next `--resume` folds it into the accounting."""
        if not self.shards or self.learners is None:
            return
        try:
            import ray

            shards = ray.get([s.get_stats.remote() for s in self.shards], timeout=30)
        except Exception:
            return
        crash = {
            "step": self.state.step,
            "totals": self._totals(shards),
            "lost_queued": self.state.lost_queued + sum(s["depth"] for s in shards),
            "peak_bytes": max(s["peak_bytes"] for s in shards),
            "actor_restarts": self.state.actor_restarts,  # restarts seen after the last checkpoint count too
        }
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        (root / "crash.json").write_text(json.dumps(crash))

    def _restore(self) -> None:
        root = self.out / "checkpoints"
        latest = root / "latest"
        if not latest.is_file():
            raise DopdError(f"nothing to resume in {self.out}: no checkpoints/latest")
        tag = latest.read_text().strip()
        blob = json.loads((root / tag / "job_state.json").read_text())
        self.state = JobState(**{k: v for k, v in blob.items() if k in JobState.__dataclass_fields__})
        self.ledger = TrainedLedger.from_json(self.state.ledger)
        for uid in blob.get("trained", []):  # checkpoints written before the ledger listed every uid
            self.ledger.add(uid)
        self.state.ledger = []
        crash_file = root / "crash.json"
        if crash_file.is_file():
            crash = json.loads(crash_file.read_text())
            if crash["step"] >= self.state.step:
                self.state.base = crash["totals"]
                self.state.lost_queued = crash["lost_queued"]
                self.peak_before = crash.get("peak_bytes", 0)
                self.state.actor_restarts = max(self.state.actor_restarts, crash.get("actor_restarts", 0))
            crash_file.rename(root / f"crash_resumed_{self.state.resumes + 1}.json")
        self.state.resumes += 1
        steps = self.learners.load(str(root), tag)
        self.log(f"dopd: resumed {self.out} at step {self.state.step}, policy version {self.state.policy_version} (ranks at {steps})")

    def _counts(self) -> dict:
        """Where every record went. Offered to the queues = produced + rejected; produced = trained + dropped +
        lost in flight + still queued (lost: queued at a crash, or delivered but not in the resumed checkpoint)."""
        shards = getattr(self, "_last_shards", None) or self._shard_stats()
        tot = self._totals(shards)
        produced = tot["accepted"] + (tot["dropped_full"] if self.cfg.cluster.queue_policy == "drop_newest" else 0)
        return {
            "records_produced": produced,
            "records_trained": self.state.records_trained,
            "records_dropped_stale": tot["dropped_stale"],
            "records_dropped_full": tot["dropped_full"],
            "records_rejected": tot["rejected"],
            "records_lost_in_flight": self.state.lost_queued + tot["delivered"] - self.state.records_trained,
            "records_queued": sum(s["depth"] for s in shards),
            "queue_peak_bytes": max([s["peak_bytes"] for s in shards] + [getattr(self, "peak_before", 0)]),
            "queue_max_bytes": self.cfg.cluster.queue_max_bytes,
        }

    def _summary(self, wall_s: float) -> dict:
        c = self.cfg
        self._shard_stats()
        return {
            "steps": self.state.step,
            "steps_planned": c.sft.warmup_steps + c.learner.steps if c.mode == "opd" else c.learner.steps,
            "policy_version": self.state.policy_version,
            **self._counts(),
            "records_consumed": self.state.records_consumed,
            "records_trained_twice": self.state.records_trained_twice,
            "exactly_once_state_bytes": len(json.dumps(self.ledger.to_json())),
            "actor_restarts": self.state.actor_restarts,
            "resumes": self.state.resumes,
            "final_tau": self.state.history[-1]["tau"],
            "final_alpha": self.state.history[-1]["alpha"],
            "learner_flops": self.state.flops,
            "wall_s": wall_s,
            "actors": c.cluster.actors,
            "learners": c.cluster.learners,
            "shards": c.cluster.shards or c.cluster.learners,
            "zero_stage": c.learner.zero_stage,
            "target": self.target_info,
            "metrics_port": getattr(self, "metrics_port", None),
        }

    def _save_drafter(self) -> None:
        import ray
        import torch

        from dopd.common.drafters import build_drafter
        from dopd.common.models import load_frozen_io

        state = ray.get(self.fleet.weights[0]) if self.fleet.weights is not None else None
        if state is None:
            return
        info, embed, head, hf = load_frozen_io(self.cfg.model.target)
        d = build_drafter(self.cfg.drafter, info, hf, embed, head, seed=self.cfg.seed, placeholder_vocab=True)  # the map comes with the state
        d.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
        d.save_pretrained(self.out / "drafter")

    def shutdown(self) -> None:
        import ray

        if self.prom_target:
            try:
                from dopd.prometheus import unregister_job_target

                unregister_job_target(self.prom_target)
            except ImportError:
                pass
        self.metrics.close()
        handles = (self.fleet.handles if self.fleet else []) + (self.learners.handles if self.learners else []) + self.shards
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
        if self.ray_mode == "embedded":
            ray.shutdown()


def run_distributed(cfg: Config, resume: bool = False, hooks=None, log=print) -> dict:
    cluster_address(cfg)  # sets Ray's auth mode for a recorded cluster before anything imports ray
    return DistributedJob(cfg, resume=resume, hooks=hooks, log=log).run()
