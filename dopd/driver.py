"""The Ray backend: N rollout actors -> S queue shards -> M ZeRO learner ranks -> new weights -> actors.

The loop is dopd/train.py's; this backend places its pieces (a placement group on the Ray cluster, or an embedded
local Ray) through the groups in dopd/fleet.py (`RolloutFleet`, `LearnerGroup`: placement, fan-out, recovery of a
killed actor), serves the job's /metrics endpoint and keeps the accounts: every trained record's (actor,
incarnation, seq) goes into a bounded ledger (dopd/exactly_once.py) saved in every checkpoint, so
`records_trained_twice` counts any record delivered twice, and every record offered to the queues ends up trained,
dropped (by reason), rejected, lost in flight at a crash, or still queued.

Rollouts: with `cluster.rollout=async` (the default here) the actors roll out continuously into the shards and each
learner rank pulls its micro-batches from its own shard(s), records up to `cluster.max_staleness` versions old;
with `sync` the driver asks the actors for one round per refresh (as the in-process runner does) and hands each
rank its share, 0 versions stale. Publishing is `learners.gather_weights()` then `fleet.set_weights(ref, version)`.

A learner crash cannot be repaired inside the job (its torch.distributed group is gone): the job stops and
`dopd train --resume DIR` continues from the last good checkpoint. Records in the queues at the crash are lost,
never duplicated: the resumed actors are new incarnations. The crashing job writes checkpoints/crash.json (its
counters and what was still queued) so the resumed job's accounts still add up.
"""

from __future__ import annotations

import json
import os
import time

from dopd.backend import Accounts, Backend, RunState, aggregate
from dopd.common.config import Config
from dopd.common.errors import DopdError
from dopd.connection import cluster_address, connect
from dopd.exactly_once import TrainedLedger
from dopd.fleet import LearnerGroup, LearnerLost, RolloutFleet, make_shards
from dopd.local import rollout_row
from dopd.metrics import JobMetrics
from dopd.sinks import make_sinks

_COUNT_KEYS = ("accepted", "rejected", "dropped_stale", "dropped_full", "delivered")


class RayFleet(Backend):
    name = "ray"

    def __init__(self, cfg: Config, log=print):
        super().__init__(cfg, log)
        cluster_address(cfg)  # sets Ray's auth mode for a recorded cluster before anything imports ray
        self.metrics = JobMetrics()
        self.fleet: RolloutFleet | None = None
        self.learners: LearnerGroup | None = None
        self.shards: list = []
        self.sync = cfg.cluster.rollout == "sync"
        self.ledger = TrainedLedger()
        self.acc: dict = {
            "records_consumed": 0,
            "records_trained_twice": 0,
            "actor_restarts": 0,
            "lost_queued": 0,
            "base": {},
            "records_produced": 0,
        }
        self.actor_totals: dict[tuple[int, int], dict] = {}
        self.shard_seen: dict[tuple[str, str], int] = {}
        self.traffic_seen: dict[str, int] = {}
        self.buffer: list[bytes] = []  # sync: the round's records not trained yet
        self.rows: list[dict] = []  # async: rollout rows of actor batches seen since the last step
        self.prom_target: str | None = None
        self.metrics_port: int | None = None
        self.ray_mode = ""
        self.pg = None
        self.started = False
        self._spec: dict | None = None
        self._last_shards: list[dict] | None = None
        self.peak_before = 0

    # --- setup ----------------------------------------------------------------------------------------------
    def start(self, state: RunState, ckpt, resumed: bool) -> None:
        c = self.cfg
        self._plan_and_connect()
        mode = self.ray_mode
        self.log(
            f"dopd: Ray {'(embedded, local)' if mode == 'embedded' else mode}; {c.cluster.actors} actors, {c.cluster.learners} learner ranks (ZeRO-{c.learner.zero_stage}), {c.cluster.rollout} rollouts"
        )
        self._prompts()
        self.feed = None
        if c.rollout.source == "traffic":  # learning from a `dopd serve` (get-or-create: the serve side may own it)
            from dopd.traffic import feed_actor

            self.feed = feed_actor(c.rollout.traffic_buffer)
        self._place()
        self._serve_metrics()
        # TensorBoard / W&B (when on) under the Prometheus names, fed by the same typed updates: the loop's rows
        # (`observe`), written after the loop counted the step
        self.metrics.attach(make_sinks(c, fresh=not resumed, step=state.step), step=lambda: state.step)
        if ckpt is None:
            return
        import ray

        self.learners.load(ray.put(ckpt.weights()), ray.put(ckpt.learner()))
        if self.sync:
            self.buffer = ckpt.records()
        saved = state.runner
        if saved:
            self.acc.update({k: v for k, v in saved.items() if k in self.acc})
            self.ledger = TrainedLedger.from_json(saved.get("ledger", []))
        actors = saved.get("actors", [])
        if len(actors) == len(self.fleet):
            if not all(
                self.fleet.load_states(actors)
            ):  # each actor continues its prompt order where the checkpoint left it
                self.log(
                    "dopd: the checkpoint's prompt orders were for other prompts or another seed: they start afresh"
                )
        elif actors:
            self.log(
                f"dopd: the checkpoint has {len(actors)} rollout actor(s), this run {len(self.fleet)}: prompt orders start afresh"
            )
        if resumed:
            self._fold_crash(state)

    def _plan_and_connect(self) -> None:
        """The resource plan (dopd/plan.py), refused before anything starts when it cannot fit; then Ray, told the
        real CPU count, and every worker given the plan's thread budget. On a joined cluster the plan is the
        cluster's, read from Ray once joined."""
        import dataclasses
        import sys

        from dopd.plan import Machine, check, make_plan, thread_env

        c = self.cfg
        in_process = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # e.g. dopd serve --learn's
        joined = bool(cluster_address(c)) or in_process
        plan = None if joined else make_plan(c, Machine.local())
        if plan is not None:
            check(plan)
        self.ray_mode = connect(c, env=thread_env(plan) if plan else None)
        if plan is None:  # a Ray this process already uses: plan over the CPUs its other work left free
            plan = make_plan(c, Machine.from_ray(free_cpus=in_process))
            check(plan)
        self.plan = plan
        self.log(plan.render())
        if plan.warning():
            self.log(plan.warning())
        # what each process asks Ray for: the plan's (a share of the cores when oversubscribed)
        cl = dataclasses.replace(c.cluster, actor_num_cpus=plan.actor_cpus, learner_num_cpus=plan.learner_cpus)
        self.place_cfg = dataclasses.replace(c, cluster=cl)
        self.worker_env = thread_env(plan)

    def _prompts(self):
        from transformers import AutoTokenizer

        from dopd.common.models import load_target_info, resolve_target
        from dopd.prompts import run_prompts

        c = self.cfg
        tok = AutoTokenizer.from_pretrained(resolve_target(c.model.target, quiet=True))
        self.target_info = load_target_info(c.model.target).to_dict()
        self.prompts = run_prompts(c, tok)
        self.write_split(self.prompts.split)
        self.log(self.prompts.summary())
        self.eval_ids = self.prompts.eval_ids[: c.eval.num_prompts]

    def _place(self):
        """One placement group (actor bundles first, then learner bundles if learners ask for resources), the
        queue shards, the learner group, then the rollout fleet."""
        from ray.util.placement_group import placement_group

        c = self.place_cfg.cluster
        N, M = c.actors, c.learners
        name = self.job_name = f"{self.out.name}-{os.getpid()}"
        bundles = [{"CPU": c.actor_num_cpus, "GPU": c.actor_num_gpus} for _ in range(N)]
        lb = {"CPU": c.learner_num_cpus, "GPU": c.learner_num_gpus}
        has_learner_bundle = any(v > 0 for v in lb.values())
        if has_learner_bundle:
            bundles += [lb for _ in range(M)]
        bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.001} for b in bundles]
        self.pg = placement_group(bundles, strategy="PACK", name=f"dopd-{name}")
        if not self.pg.wait(timeout_seconds=c.placement_timeout_s):
            raise DopdError(
                f"the cluster cannot place {N} actors and {M} learners with these resources: {bundles} (see `dopd cluster status`)"
            )
        self.shards = make_shards(self.cfg, name)
        pc, env = self.place_cfg, self.worker_env
        self.learners = LearnerGroup(pc, name, self.pg, self.shards, N if has_learner_bundle else None, env=env)
        self.fleet = RolloutFleet(
            pc,
            name,
            self.pg,
            self.shards,
            self.prompts.rollout,
            log=self.log,
            on_restart=self._on_actor_restart,
            env=env,
            feed=self.feed,
        )

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
        self.metrics_port = self.metrics.serve(m.host, m.port)
        try:
            from dopd.prometheus import register_job_target

            self.prom_target = self.job_name
            register_job_target(
                self.job_name, m.host if m.host != "0.0.0.0" else "127.0.0.1", self.metrics_port, {"run": self.out.name}
            )
        except ImportError:
            pass
        self.log(f"dopd: metrics on http://{m.host}:{self.metrics_port}/metrics")

    # --- the loop's calls -------------------------------------------------------------------------------------
    def sft_data(self, needed: bool) -> None:
        if not needed and self.learners.vocab_chosen():
            return
        c = self.cfg
        if c.sft.sequences:
            from dopd.prompts import read_sequences

            items = read_sequences(c.sft.sequences)
            self.log(
                f"dopd: SFT data: {len(items)} sequences from {c.sft.sequences}, scored over {len(self.fleet)} rollout actors"
            )
        else:
            items = self.prompts.sft
            self.log(
                f"dopd: SFT data: the target answers {len(items)} prompts, split over {len(self.fleet)} rollout actors"
            )
        self.learners.set_teacher(self.fleet.teacher_data(items))

    def rollout(self, state: RunState) -> list[dict]:
        if not self.sync:
            self._watch_actors()
            rows, self.rows = self.rows, []
            return rows
        c = self.cfg
        need = c.learner.micro_batch_size * len(self.learners)
        if len(self.buffer) >= need:
            return []
        rows = []
        for i, (data, st) in enumerate(self.fleet.produce(c.learner.refresh_every * need)):
            self.buffer.extend(data)
            self.acc["records_produced"] += len(data)
            rows.append(rollout_row(i, {**st, "records": len(data)}))
        return rows

    def learn(self, phase: str, state: RunState) -> dict:
        if phase == "sft":
            res = self.learners.sft_step()
        elif self.sync:
            mb, M = self.cfg.learner.micro_batch_size, len(self.learners)
            per_rank = [self.buffer[r * mb : (r + 1) * mb] for r in range(M)]
            self.buffer = self.buffer[M * mb :]
            res = self.learners.opd_step(state.policy_version, records=per_rank)
        else:
            res = self.learners.opd_step(state.policy_version, wait=self._watch_actors)
        out = aggregate(res)
        self.acc["records_consumed"] += out["records"]
        for uid in out["uids"]:
            if not self.ledger.add(tuple(uid)):
                self.acc["records_trained_twice"] += 1
        self._shard_stats()
        self._traffic_metrics()
        return out

    def observe(self, row: dict, state: RunState) -> None:
        """Every row the loop writes (steps, rollout batches, evaluations) -> Prometheus and the sinks: the same
        path as the in-process runner's (JobMetrics.observe)."""
        self.metrics.observe(row)

    def publish(self, version: int) -> None:
        t0 = time.perf_counter()
        ref = self.learners.gather_weights()
        self.fleet.set_weights(ref, version)
        if self.feed is not None:  # the serving replicas poll it between engine steps
            self.feed.publish.remote([ref], version)
        self.policy_version = version  # the newest the actors hold (what a learner asks a shard for)
        self.metrics["dopd_publish_latency_seconds"].observe(time.perf_counter() - t0)
        self.metrics["dopd_policy_version"].set(version)
        if not self.sync and not self.started:
            self.fleet.start()
            self.started = True

    def evaluate(self) -> dict:
        return self.fleet.evaluate(self.learners.gather_weights(), self.eval_ids)

    def spec(self) -> dict:
        if self._spec is None:
            self._spec = self.learners.spec()
        return self._spec

    def weights(self) -> dict:
        import ray

        return ray.get(self.learners.gather_weights())

    def training_state(self) -> dict:
        return self.learners.training_state()

    def drafter_params(self) -> int:
        return self.learners.num_parameters()

    def pending(self) -> list[bytes]:
        return list(self.buffer)

    def save_state(self, state: RunState) -> None:
        # the shard counters so far: a resumed job's shards start at 0, so its accounts add these
        totals = self._totals(self._shard_stats())
        state.runner = {**self.acc, "base": totals, "ledger": self.ledger.to_json(), "actors": self.fleet.states()}

    def rollouts_done(self) -> None:
        if self.started:
            self.fleet.stop()
            self.started = False

    def finish(self, summary: dict) -> None:
        m = self.cfg.metrics
        if m.enabled and m.linger_s > 0:
            try:
                self._shard_stats()
            except Exception:
                pass
            time.sleep(m.linger_s)

    def crashed(self, state: RunState, error: BaseException) -> BaseException | None:
        self._record_crash(state)
        if isinstance(error, LearnerLost):
            return DopdError(f"{error}; continue with: dopd train --resume {self.out}")
        return None

    # --- watching -------------------------------------------------------------------------------------------
    def _on_actor_restart(self, i: int) -> None:
        self.acc["actor_restarts"] += 1
        self.metrics["dopd_actor_restarts"].labels(actor=str(i)).inc()

    def _watch_actors(self) -> None:
        """Recover dead actors (the fleet) and turn their new batches into rollout metrics and rows."""
        for i, st in self.fleet.check():
            key = (i, st["incarnation"])
            prev = self.actor_totals.get(key, {"tokens": 0, "anchors": 0, "records": 0, "batches": 0})
            tot, last = st["totals"], st["last"]
            if tot["batches"] > prev["batches"] and last:
                # the batches since the last look: their tokens, anchors and records (the row carries the totals'
                # increments, so the run's token count and the metrics add up when several batches came in between)
                inc = {k: tot[k] - prev[k] for k in ("tokens", "anchors", "records")}
                self.rows.append(rollout_row(i, {**last, **inc}))
            self.actor_totals[key] = dict(tot)

    def _shard_stats(self) -> list[dict]:
        import ray

        stats = ray.get([s.get_stats.remote() for s in self.shards])
        for st in stats:
            sid = str(st["shard"])
            self.metrics["dopd_queue_depth"].labels(shard=sid).set(st["depth"])
            self.metrics["dopd_queue_bytes"].labels(shard=sid).set(st["bytes"])
            for key, name in (
                ("dropped_stale", "dopd_records_dropped_stale"),
                ("dropped_full", "dopd_records_dropped_full"),
                ("rejected", "dopd_records_rejected"),
            ):
                delta = st[key] - self.shard_seen.get((sid, key), 0)
                if delta > 0:
                    self.metrics[name].labels(shard=sid).inc(delta)
                self.shard_seen[(sid, key)] = st[key]
        self._last_shards = stats
        return stats

    # --- accounts ---------------------------------------------------------------------------------------------
    def _totals(self, shards: list[dict]) -> dict:
        """Shard counters since the first job of this run (this job's shards + what earlier jobs carried over)."""
        base = self.acc["base"]
        return {k: base.get(k, 0) + sum(s[k] for s in shards) for k in _COUNT_KEYS}

    def _record_crash(self, state: RunState) -> None:
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
            "step": state.step,
            "totals": self._totals(shards),
            "lost_queued": self.acc["lost_queued"] + sum(s["depth"] for s in shards),
            "peak_bytes": max(s["peak_bytes"] for s in shards),
            "actor_restarts": self.acc["actor_restarts"],  # restarts seen after the last checkpoint count too
        }
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        (root / "crash.json").write_text(json.dumps(crash))

    def _fold_crash(self, state: RunState) -> None:
        crash_file = self.out / "checkpoints" / "crash.json"
        if not crash_file.is_file():
            return
        crash = json.loads(crash_file.read_text())
        if crash["step"] >= state.step:
            self.acc["base"] = crash["totals"]
            self.acc["lost_queued"] = crash["lost_queued"]
            self.peak_before = crash.get("peak_bytes", 0)
            self.acc["actor_restarts"] = max(self.acc["actor_restarts"], crash.get("actor_restarts", 0))
        crash_file.rename(crash_file.with_name(f"crash_resumed_{state.resumes}.json"))

    def accounts(self, state: RunState) -> Accounts:
        """Where every record went. Offered to the queues = produced + rejected; produced = trained + dropped +
        lost in flight + still queued (lost: queued at a crash, or delivered but not in the resumed checkpoint)."""
        c = self.cfg.cluster
        shards = self._shard_stats()
        tot = self._totals(shards)
        if self.sync:  # the driver handed the records over: none went through the shards
            produced, delivered, queued = self.acc["records_produced"], state.records_trained, len(self.buffer)
        else:
            produced = tot["accepted"] + (tot["dropped_full"] if c.queue_policy == "drop_newest" else 0)
            delivered, queued = tot["delivered"], sum(s["depth"] for s in shards)
        return Accounts(
            records_produced=produced, records_consumed=self.acc["records_consumed"],
            records_trained_twice=self.acc["records_trained_twice"], records_dropped_stale=tot["dropped_stale"],
            records_dropped_full=tot["dropped_full"], records_rejected=tot["rejected"],
            records_lost_in_flight=self.acc["lost_queued"] + delivered - state.records_trained, records_queued=queued,
            queue_peak_bytes=max([s["peak_bytes"] for s in shards] + [self.peak_before]), queue_max_bytes=c.queue_max_bytes,
            exactly_once_state_bytes=len(json.dumps(self.ledger.to_json())), actor_restarts=self.acc["actor_restarts"],
            actors=c.actors, learners=c.learners, shards=c.shards or c.learners, zero_stage=self.cfg.learner.zero_stage,
            metrics_port=self.metrics_port, traffic=self._traffic_stats(),
        )  # fmt: skip

    def _traffic_metrics(self) -> None:
        """rollout.source=traffic: the feed's counts -> Prometheus (served requests taken, dropped, waiting)."""
        if self.feed is None:
            return
        st = self._traffic_stats()
        if "error" in st:
            return
        for key, name in (("taken", "dopd_traffic_taken"), ("dropped", "dopd_traffic_dropped")):
            delta = st[key] - self.traffic_seen.get(key, 0)
            if delta > 0:
                self.metrics[name].inc(delta)
            self.traffic_seen[key] = st[key]
        self.metrics["dopd_traffic_waiting"].set(st["depth"])

    def _traffic_stats(self) -> dict:
        """rollout.source=traffic: the feed's counts (served texts offered, queued, dropped, taken, waiting)."""
        if self.feed is None:
            return {}
        import ray

        try:
            return ray.get(self.feed.stats.remote(), timeout=10)
        except Exception as e:  # the feed is gone: say so in the summary rather than fail the run's end
            return {"error": f"{type(e).__name__}: {str(e)[-200:]}"}

    def close(self) -> None:
        import ray

        if self.prom_target:
            try:
                from dopd.prometheus import unregister_job_target

                unregister_job_target(self.prom_target)
            except ImportError:
                pass
        self.metrics.close()
        handles = (
            (self.fleet.handles if self.fleet else []) + (self.learners.handles if self.learners else []) + self.shards
        )
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


__all__ = ["RayFleet"]
