"""The distributed job: N rollout actors -> S queue shards -> M ZeRO learner ranks -> new weights -> actors.

The driver places the pieces (a placement group on the Ray cluster, or an embedded local Ray), runs the learner
group in lockstep (each step every rank pulls a micro-batch from its own shard), publishes weights every
`refresh_every` steps, watches the actors (a killed actor is restarted by Ray; the driver sees the new
incarnation, re-sends the current weights and restarts its loop), serves the job's /metrics endpoint, and keeps
the exactly-once accounting: every trained record's (actor, incarnation, seq) id goes into a set that is saved in
every checkpoint, so `records_trained_twice` would count any record delivered twice.

A learner crash cannot be repaired inside the job (its torch.distributed group is gone): the job stops and
`dopd train --resume DIR` continues from the last checkpoint (DeepSpeed ZeRO state + step + policy version +
accounting). Records in the queues at the crash are lost, never duplicated: the resumed actors are new
incarnations.
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

CLUSTER_FILE = "cluster.json"


@dataclass
class JobState:
    step: int = 0
    policy_version: int = 0
    flops: float = 0.0
    records_consumed: int = 0
    records_trained_twice: int = 0
    actor_restarts: int = 0
    base: dict = field(default_factory=dict)  # counts carried over from before a resume (shard totals)
    trained: list = field(default_factory=list)  # uids [actor, incarnation, seq] of every trained record (on disk)
    history: list = field(default_factory=list)  # held-out evaluations


def _env() -> dict:
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def cluster_address(cfg: Config) -> str | None:
    """The configured address, else the one `dopd cluster up` recorded, else None (embedded Ray)."""
    if cfg.cluster.address:
        return cfg.cluster.address
    from dopd.paths import state_dir

    f = state_dir() / CLUSTER_FILE
    if f.is_file():
        try:
            info = json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
        use_recorded_auth(info)
        return info.get("address")
    return None


def use_recorded_auth(info: dict) -> None:
    """A head `dopd cluster up` started wants the token in ~/.ray/auth_token; call before `import ray`."""
    if info.get("auth") == "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def is_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, ray://host:port) names this machine's loopback interface."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def keep_ray_on_loopback() -> None:
    """Make this process's Ray resolve "127.0.0.1" to itself when it joins a loopback-only head.

    Ray rewrites a loopback bootstrap address to the machine's primary IP unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    which it reads once, when `ray` is first imported; a loopback head does not listen there. Only for loopback
    addresses: a driver joining a remote head must keep its routable IP.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set


def join_cluster(address: str, **init_kwargs) -> None:
    """`ray.init` at a running cluster. Ray rewrites a loopback bootstrap address to this node's primary IP, where a
    loopback-only head does not listen; pinning the driver's node address keeps it on 127.0.0.1."""
    local = {}
    if is_loopback(address):
        keep_ray_on_loopback()
        local = {"_node_ip_address": "127.0.0.1"}
    import ray

    ray.init(address=address, namespace="dopd", log_to_driver=False, **init_kwargs, **local)


def connect(cfg: Config) -> str:
    """Join the recorded/configured cluster or start an embedded local Ray (loopback only)."""
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    address = cluster_address(cfg)  # before `import ray`: Ray's core reads RAY_AUTH_MODE when it is loaded
    import ray

    if ray.is_initialized():
        return "existing"
    runtime_env = {"env_vars": {k: v for k, v in {**_env(), "DOPD_CACHE": os.environ.get("DOPD_CACHE", "")}.items() if v}}
    if address:
        join_cluster(address, runtime_env=runtime_env)
        return address
    need = cfg.cluster.actors * cfg.cluster.actor_num_cpus + cfg.cluster.learners * cfg.cluster.learner_num_cpus
    ray.init(
        address="local",  # never join a cluster found in /tmp/ray or RAY_ADDRESS by accident: that one is configured
        num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
        object_store_memory=cfg.cluster.object_store_memory,
        include_dashboard=False,
        namespace="dopd",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=False,
    )
    return "embedded"


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
        self.actors: list = []
        self.shards: list = []
        self.learners: list = []
        self.weights_ref = None
        self.known: dict[int, int] = {}  # actor index -> incarnation
        self.actor_totals: dict[tuple[int, int], dict] = {}
        self.trained: set[tuple[int, int, int]] = set()
        self.shard_seen: dict[tuple[str, str], int] = {}
        self.prom_target: str | None = None
        self.ray_mode = ""

    # --- setup ----------------------------------------------------------------------------------------------
    def _prompts(self):
        from transformers import AutoTokenizer

        from dopd.common.models import resolve_target
        from dopd.common.prompts import encode_all, load_prompt_set, split_prompts

        c = self.cfg
        tok = AutoTokenizer.from_pretrained(resolve_target(c.model.target, quiet=True))
        from dopd.common.models import load_target_info

        self.target_info = load_target_info(c.model.target).to_dict()
        prompts = load_prompt_set(c.data.prompts)
        if c.data.eval_prompts:
            train, evals = prompts, load_prompt_set(c.data.eval_prompts)[: c.data.num_eval]
        else:
            sp = split_prompts(prompts, c.data.num_eval, c.data.seed, c.data.prompts)
            train, evals = sp.train, sp.eval
            (self.out / "split.json").write_text(json.dumps(sp.describe(), indent=1))
        if c.data.num_train is not None:
            train = train[: c.data.num_train]
        train_ids, train_p = encode_all(tok, train, c.data.max_prompt_tokens, drop_long=True)
        eval_ids, _ = encode_all(tok, evals, c.data.max_prompt_tokens, drop_long=False)
        self.train = [(p.id, ids) for p, ids in zip(train_p, train_ids)]
        self.eval_ids = eval_ids[: c.eval.num_prompts]

    def _place(self):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dopd.actors.actor import rollout_actor_class
        from dopd.common.queue import QueueShard
        from dopd.learner.zero import learner_actor_class

        c = self.cfg.cluster
        N, M = c.actors, c.learners
        S = c.shards or M
        name = f"{self.out.name}-{os.getpid()}"
        bundles = [{"CPU": c.actor_num_cpus, "GPU": c.actor_num_gpus} for _ in range(N)]
        lb = {"CPU": c.learner_num_cpus, "GPU": c.learner_num_gpus}
        has_learner_bundle = any(v > 0 for v in lb.values())
        if has_learner_bundle:
            bundles += [lb for _ in range(M)]
        bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.001} for b in bundles]
        self.pg = placement_group(bundles, strategy="PACK", name=f"dopd-{name}")
        if not self.pg.wait(timeout_seconds=c.placement_timeout_s):
            raise DopdError(f"the cluster cannot place {N} actors and {M} learners with these resources: {bundles} (see `dopd cluster status`)")
        Shard = ray.remote(num_cpus=0)(QueueShard)
        self.shards = [
            Shard.options(name=f"{name}.shard.{s}").remote(s, c.queue_max_bytes, c.queue_policy, c.max_staleness, c.max_record_bytes)
            for s in range(S)
        ]
        device = "cuda" if c.learner_num_gpus > 0 else "cpu"
        Learner = learner_actor_class()
        self.learners = []
        for r in range(M):
            my_shards = [self.shards[s] for s in range(S) if s % M == r] or [self.shards[r % S]]
            opts = {"name": f"{name}.learner.{r}", "num_cpus": c.learner_num_cpus, "num_gpus": c.learner_num_gpus}
            if has_learner_bundle:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=N + r)
            self.learners.append(Learner.options(**opts).remote(self.cfg.to_dict(), r, M, my_shards, device))
        addr, port = ray.get(self.learners[0].rendezvous.remote())
        if self.cfg.cluster.master_port:
            port = self.cfg.cluster.master_port
        ray.get([learner.init.remote(addr, port) for learner in self.learners])
        Actor = rollout_actor_class()
        per_actor = [self.train[i::N] for i in range(N)]
        self.actors = [
            Actor.options(
                name=f"{name}.actor.{i}",
                num_cpus=c.actor_num_cpus,
                num_gpus=c.actor_num_gpus,
                max_restarts=c.max_actor_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(self.cfg.to_dict(), i, per_actor[i] or self.train, self.actor_shards(i, N, S))
            for i in range(N)
        ]
        for i, info in enumerate(ray.get([a.ready.remote() for a in self.actors])):
            self.known[i] = info["incarnation"]
        self.name = name

    def actor_shards(self, i: int, N: int, S: int) -> list:
        """Routing by actor: actor i feeds shard i % S; with fewer actors than shards, actor i feeds every shard
        s with s % N == i (round-robin), so every learner rank's shard has a producer."""
        return [self.shards[s] for s in range(S) if s % N == i] if N < S else [self.shards[i % S]]

    def _serve_metrics(self):
        m = self.cfg.metrics
        if not m.enabled:
            return
        # every labelled series exists from the start (at 0), so rates and "no restarts yet" are data, not gaps
        for i in range(len(self.actors)):
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
    def _publish(self) -> None:
        from dopd.learner.publish import publish

        t0 = time.perf_counter()
        latency, ref, failed = publish(self.learners, self.actors, self.state.policy_version)
        self.weights_ref = ref
        self.metrics["dopd_publish_latency_seconds"].observe(latency)
        self.metrics["dopd_policy_version"].set(self.state.policy_version)
        for i in failed:
            self._recover_actor(i)
        self.log_debug(f"published policy version {self.state.policy_version} in {time.perf_counter() - t0:.2f}s")

    def log_debug(self, msg: str) -> None:
        if os.environ.get("DOPD_DEBUG"):
            self.log(msg)

    def _recover_actor(self, i: int) -> None:
        """Wait for Ray to bring actor i back, then give it the current weights and restart its loop."""
        import ray

        deadline = time.time() + 600
        while True:
            try:
                info = ray.get(self.actors[i].ready.remote(), timeout=60)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:
                if time.time() > deadline:  # out of restarts (cluster.max_actor_restarts) or the node is gone
                    raise DopdError(f"rollout actor {i} did not come back after a failure: {e}") from None
                time.sleep(1)
        if info["incarnation"] != self.known.get(i):
            self.known[i] = info["incarnation"]
            self.state.actor_restarts += 1
            self.metrics["dopd_actor_restarts"].labels(actor=str(i)).inc()
            self.log(f"dopd: rollout actor {i} restarted (incarnation {info['incarnation']}); re-sending weights")
        if self.weights_ref is not None:
            ray.get(self.actors[i].set_weights.remote([self.weights_ref], self.state.policy_version))
        ray.get(self.actors[i].start.remote())

    def _check_actors(self) -> None:
        import ray

        refs = [a.stats.remote() for a in self.actors]
        for i, ref in enumerate(refs):
            try:
                st = ray.get(ref, timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                self._recover_actor(i)
                continue
            if st["incarnation"] != self.known.get(i):
                self._recover_actor(i)
                continue
            if st["error"]:
                raise DopdError(f"rollout actor {i} failed:\n{st['error']}")
            key = (i, st["incarnation"])
            prev = self.actor_totals.get(key, {"tokens": 0, "anchors": 0, "records": 0, "batches": 0})
            tot = st["totals"]
            last = st["last"]
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

    def _eval(self) -> dict:
        import ray

        for i, a in enumerate(self.actors):
            try:
                res = ray.get(a.evaluate.remote(self.eval_ids))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self._recover_actor(i)
        else:
            raise DopdError("no rollout actor could run the held-out evaluation")
        res["step"] = self.state.step
        self.state.history.append(res)
        self.metrics.heldout(res["tau"], res["alpha"])
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"event": "eval", "time": time.time(), **res}) + "\n")
        return res

    def _sft_warmup(self, total_warm: int, pbar) -> None:
        import ray

        c = self.cfg
        n = min(c.sft.num_prompts or len(self.train), len(self.train))
        self.log(f"dopd: SFT warm-up data: the target (on actor 0) answers {n} prompts")
        data = ray.get(self.actors[0].teacher_data.remote(self.train[:n]))
        box = [ray.put(data)]
        ray.get([learner.set_teacher.remote(box) for learner in self.learners])
        while self.state.step < total_warm:
            res = ray.get([learner.sft_step.remote() for learner in self.learners])
            self._after_step(res, "sft", pbar)

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
                u = tuple(uid)
                if u in self.trained:
                    st.records_trained_twice += 1
                self.trained.add(u)
            staleness += r.get("staleness", [])
        n = len(res)
        loss = sum(r["loss"] for r in res) / n
        self.metrics.learner(loss, sum(r["acc"] for r in res) / n, sum(r["rej"] for r in res) / n, max(r["grad_norm"] for r in res), max(r["seconds"] for r in res), flops, records, staleness)
        row = {"event": "step", "time": time.time(), "step": st.step, "phase": phase, "loss": loss, "flops": st.flops, "policy_version": st.policy_version, "records": records, "staleness": staleness}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss:.3f}", v=st.policy_version, tau=f"{st.history[-1]['tau']:.2f}" if st.history else "-")

    # --- checkpoints ----------------------------------------------------------------------------------------
    _COUNT_KEYS = ("accepted", "rejected", "dropped_stale", "dropped_full")

    def _checkpoint(self) -> None:
        """DeepSpeed ZeRO state on every rank + the driver's step, version and exactly-once accounting."""
        import ray

        root = self.out / "checkpoints"
        tag = f"step_{self.state.step:07d}"
        ray.get([learner.save.remote(str(root), tag) for learner in self.learners])
        shards = self._shard_stats()
        blob = asdict(self.state)
        blob["trained"] = [list(u) for u in sorted(self.trained)]
        blob["base"] = {k: self.state.base.get(k, 0) + sum(s[k] for s in shards) for k in self._COUNT_KEYS}
        (root / tag).mkdir(parents=True, exist_ok=True)
        (root / tag / "job_state.json").write_text(json.dumps(blob))
        (root / "latest").write_text(tag)

    def _restore(self) -> None:
        import ray

        root = self.out / "checkpoints"
        latest = root / "latest"
        if not latest.is_file():
            raise DopdError(f"nothing to resume in {self.out}: no checkpoints/latest")
        tag = latest.read_text().strip()
        self.state = JobState(**json.loads((root / tag / "job_state.json").read_text()))
        self.trained = {tuple(u) for u in self.state.trained}
        self.state.trained = []
        steps = ray.get([learner.load.remote(str(root), tag) for learner in self.learners])
        self.log(f"dopd: resumed {self.out} at step {self.state.step}, policy version {self.state.policy_version} (ranks at {steps})")

    def _counts(self) -> dict:
        shards = getattr(self, "_last_shards", None) or self._shard_stats()
        base = self.state.base
        tot = {k: base.get(k, 0) + sum(s[k] for s in shards) for k in self._COUNT_KEYS}
        produced = tot["accepted"] + (tot["dropped_full"] if self.cfg.cluster.queue_policy == "drop_newest" else 0)
        return {"records_produced": produced, "records_dropped_stale": tot["dropped_stale"], "records_dropped_full": tot["dropped_full"], "records_rejected": tot["rejected"]}

    # --- the job --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        import ray
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
            warm = c.sft.warmup_steps if c.mode == "opd" else c.learner.steps
            total = warm + c.learner.steps if c.mode == "opd" else c.learner.steps
            pbar = tqdm(total=total, initial=self.state.step, desc="learner steps", disable=not sys.stderr.isatty())
            if self.state.step < warm:
                self._sft_warmup(warm, pbar)
                self.state.policy_version += 1
            if c.mode == "opd":
                self._publish()
                ray.get([a.start.remote() for a in self.actors])
                if not self.state.history:
                    self._eval()
                while self.state.step < total:
                    refs = [learner.opd_step.remote(self.state.policy_version) for learner in self.learners]
                    while True:
                        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
                        if len(ready) == len(refs):
                            break
                        self._check_actors()
                    try:
                        res = ray.get(refs)
                    except ray.exceptions.RayActorError as e:
                        raise DopdError(f"a learner rank died ({e}); continue with: dopd train --resume {self.out}") from None
                    self._after_step(res, "opd", pbar)
                    if (self.state.step - warm) % c.learner.refresh_every == 0:
                        self.state.policy_version += 1
                        self._publish()
                    self._check_actors()
                    self._shard_stats()
                    if self.state.step % c.learner.eval_every == 0:
                        self._eval()
                    if self.state.step % c.learner.checkpoint_every == 0:
                        self._checkpoint()
                    if "on_step" in self.hooks:
                        self.hooks["on_step"](self, self.state.step)
                ray.get([a.stop.remote() for a in self.actors])
            if not self.state.history or self.state.history[-1]["step"] != self.state.step:
                if c.mode == "sft":
                    self._publish()
                self._eval()
            self._checkpoint()
            self._save_drafter()
            pbar.close()
            summary = {
                "steps": self.state.step,
                "policy_version": self.state.policy_version,
                **self._counts(),
                "records_consumed": self.state.records_consumed,
                "records_trained_twice": self.state.records_trained_twice,
                "actor_restarts": self.state.actor_restarts,
                "final_tau": self.state.history[-1]["tau"],
                "final_alpha": self.state.history[-1]["alpha"],
                "learner_flops": self.state.flops,
                "wall_s": time.time() - t_start,
                "actors": c.cluster.actors,
                "learners": c.cluster.learners,
                "shards": c.cluster.shards or c.cluster.learners,
                "zero_stage": c.learner.zero_stage,
                "target": self.target_info,
                "metrics_port": getattr(self, "metrics_port", None),
            }
            (self.out / "run_summary.json").write_text(json.dumps(summary, indent=1))
            if c.metrics.enabled and c.metrics.linger_s > 0:
                self._check_actors_safe()
                time.sleep(c.metrics.linger_s)
            return summary
        finally:
            self.shutdown()

    def _check_actors_safe(self):
        try:
            self._shard_stats()
        except Exception:
            pass

    def _save_drafter(self) -> None:
        import ray
        import torch

        from dopd.common.drafters import build_drafter
        from dopd.common.models import load_frozen_io

        state = ray.get(self.weights_ref) if self.weights_ref is not None else None
        if state is None:
            return
        info, embed, head, hf = load_frozen_io(self.cfg.model.target)
        d = build_drafter(self.cfg.drafter, info, hf, embed, head, seed=self.cfg.seed)
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
        for h in self.actors + self.learners + self.shards:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        if getattr(self, "pg", None) is not None:
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
