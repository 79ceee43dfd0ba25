"""Chaos soak: the distributed job under every fault at once, on a real local Ray, with the accounts checked.

    python bench/soak.py --minutes 10 --json docs/soak/soak_10min.json

Starts its own loopback Ray head (`ray start --head --block`, token auth off, its own temp dir), runs `dopd train`
(tiny models, 4 rollout actors, 2 ZeRO-2 learner ranks) against it, and from this process, joined to the same
cluster:
- kills a random rollout actor every ~20 s (Ray restarts it; the job re-sends weights);
- pushes garbage bytes and oversized bytes (over `cluster.max_record_bytes`) into random shards;
- for one window, throttles both learner ranks to 10% duty (SIGSTOP 9 s / SIGCONT 1 s), so producers run at
  about 10x the learners' rate (the report gives the learners' measured steps/s before and during): the queues fill to their byte bound and backpressure holds the actors;
- kills one learner rank's process once (SIGKILL), waits for `dopd train` to stop, and runs
  `dopd train --resume OUT`;
- samples the RSS of every process of the job (per role) every 2 s.

Then it prints and writes JSON: records produced, trained, dropped (by reason), rejected, lost in flight at the
crash, still queued, trained twice, actor restarts, resumes, final vs planned step, peak queue bytes vs the bound,
peak RSS per process role, and whether each aim held: 0 trained twice; produced + rejected = trained + dropped +
rejected + lost in flight + queued; the planned step reached; queue bytes never above the bound. Exit status 1 if
an aim failed. The job plans `--minutes` x `--steps-per-minute` learner steps (about what the 2-core CI machine
does per minute under these faults); the learner throttle and kill are placed by progress (fraction of the planned
steps), the actor kills and injections by the clock, so a slower machine runs longer and still sees every fault.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROLES = {"RolloutActor": "rollout_actor", "LearnerActor": "learner_rank", "QueueShard": "queue_shard"}


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env() -> dict:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # fmt: skip
    return env


class Soak:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.rng = random.Random(a.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="dsoak", dir="/tmp"))
        self.out = Path(a.out) if a.out else self.tmp / "run"
        self.port, *self.more_ports = free_ports(6)
        self.address = f"127.0.0.1:{self.port}"
        self.events: list[dict] = []
        self.rss: dict[str, int] = {}  # role -> peak RSS of one process of that role (bytes)
        self.rss_pids: dict[int, tuple[str, int]] = {}
        self.job_pid: int | None = None
        self.stop = threading.Event()
        self.injected = {"garbage": 0, "oversized": 0, "rejected_answers": 0}
        self.throttle = {"learner_steps_per_s_before": None, "learner_steps_per_s_during": None}
        self.t0 = time.time()
        self.steps = max(4, int(a.minutes * a.steps_per_minute))

    def log(self, what: str, **kw) -> None:
        row = {"t": round(time.time() - self.t0, 1), "event": what, **kw}
        self.events.append(row)
        print(json.dumps(row), flush=True)

    # --- the cluster --------------------------------------------------------------------------------------
    def start_ray(self) -> None:
        # this interpreter, not the `ray` script: a copied venv's scripts may name another venv's Python
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.a.num_cpus}",
               "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.tmp / 'ray'}",
               f"--object-store-memory={300 * 2**20}"]  # fmt: skip
        # every port of its own: another Ray on this machine (a test session, a colleague) must not collide
        opts = (
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
        cmd += [f"--{opt}={port}" for opt, port in zip(opts, self.more_ports)]
        self.head = subprocess.Popen(
            cmd, env=ray_env(), stdout=open(self.tmp / "ray.log", "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        for k, v in ray_env().items():
            os.environ[k] = v
        from dopd.connection import join_cluster

        deadline = time.time() + 120
        while True:
            try:
                join_cluster(self.address)
                break
            except Exception:
                if time.time() > deadline or self.head.poll() is not None:
                    raise RuntimeError(f"the soak's Ray head did not start (see {self.tmp / 'ray.log'})") from None
                time.sleep(2)
        self.log("ray_up", address=self.address, head_pid=self.head.pid)

    def stop_ray(self) -> None:
        import ray

        try:
            ray.shutdown()
        except Exception:
            pass
        if self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGTERM)
            try:
                self.head.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGKILL)

    # --- the job ------------------------------------------------------------------------------------------
    def overrides(self) -> list[str]:
        a = self.a
        return [
            "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
            "sft.num_prompts=16", "sft.max_new_tokens=16", "sft.warmup_steps=2", "rollout.max_new_tokens=16",
            "rollout.batch_size=2", "eval.max_new_tokens=12", "eval.num_prompts=4", "learner.micro_batch_size=2",
            "learner.refresh_every=2", "learner.lr=3e-3", "learner.zero_stage=2", f"learner.steps={self.steps}",
            f"learner.checkpoint_every={a.checkpoint_every}", "learner.eval_every=1000000", "cluster.actor_num_cpus=1",
            f"cluster.address={self.address}", f"cluster.queue_max_bytes={a.queue_max_bytes}",
            f"cluster.max_record_bytes={a.max_record_bytes}", "cluster.max_actor_restarts=-1", "metrics.enabled=false",
        ]  # fmt: skip

    def launch(self, resume: bool) -> subprocess.Popen:
        dopd = [sys.executable, "-m", "dopd.cli"]
        if resume:
            cmd = dopd + ["train", "--actors", "4", "--learners", "2", "--resume", str(self.out)]
        else:
            cmd = dopd + ["train", "--actors", "4", "--learners", "2", "--out", str(self.out)] + self.overrides()
        log = open(self.tmp / f"train{'_resume' if resume else ''}.log", "w")
        p = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT)
        self.job_proc = p
        self.job_pid = p.pid
        self.job_name = f"{self.out.name}-{p.pid}"
        self.log("launch", resume=resume, pid=p.pid)
        return p

    def handle(self, kind: str, i: int):
        import ray

        return ray.get_actor(f"{self.job_name}.{kind}.{i}", namespace="dopd")

    def steps_done(self) -> int:
        f = self.out / "metrics.jsonl"
        if not f.is_file():
            return 0
        n = 0
        for line in f.read_text().splitlines():
            if '"event": "step"' in line:
                n = max(n, json.loads(line)["step"])
        return n

    def in_opd(self) -> bool:
        f = self.out / "metrics.jsonl"
        return f.is_file() and '"phase": "opd"' in f.read_text()

    # --- processes ----------------------------------------------------------------------------------------
    def procs(self):
        import psutil

        out = []
        roots = [self.head.pid] + ([self.job_pid] if self.job_pid else [])
        for pid in roots:
            try:
                root = psutil.Process(pid)
                out += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return out

    def role(self, p) -> str:
        try:
            cmd = " ".join(p.cmdline())
        except Exception:
            return ""
        if p.pid == self.job_pid:
            return "driver"
        for cls, role in ROLES.items():
            if f"ray::{cls}" in cmd:
                return role
        for name in ("gcs_server", "raylet"):
            if name in cmd:
                return name
        return ""

    def sample_rss(self) -> None:
        for p in self.procs():
            role = self.role(p)
            if not role:
                continue
            try:
                rss = p.memory_info().rss
            except Exception:
                continue
            self.rss[role] = max(self.rss.get(role, 0), rss)

    def learner_pids(self) -> list[int]:
        return [p.pid for p in self.procs() if self.role(p) == "learner_rank"]

    # --- faults -------------------------------------------------------------------------------------------
    def kill_actor(self) -> None:
        import ray

        i = self.rng.randrange(4)
        try:
            ray.kill(self.handle("actor", i), no_restart=False)
            self.log("kill_actor", actor=i)
        except Exception as e:
            self.log("kill_actor_failed", actor=i, error=str(e)[:120])

    def inject(self) -> None:
        import ray

        s = self.rng.randrange(2)
        try:
            shard = self.handle("shard", s)
            r1 = ray.get(shard.put.remote(os.urandom(self.rng.randint(1, 4096))), timeout=60)
            r2 = ray.get(shard.put.remote(b"\x00" * (self.a.max_record_bytes + 1)), timeout=60)
        except Exception as e:
            self.log("inject_failed", shard=s, error=str(e)[:120])
            return
        self.injected["garbage"] += 1
        self.injected["oversized"] += 1
        self.injected["rejected_answers"] += (r1 == "rejected") + (r2 == "rejected")
        self.log("inject", shard=s, garbage=r1, oversized=r2)

    def throttle_learners(self, seconds: float) -> None:
        """10% duty for the learner ranks: SIGSTOP 9 s, SIGCONT 1 s (a learner step takes about a second here, so
        shorter cycles would let a whole step through every cycle)."""
        pids = self.learner_pids()
        t_end = time.time() + seconds
        while time.time() < t_end and not self.stop.is_set():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            time.sleep(9)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            time.sleep(1)

    def _throttle_window(self) -> None:
        s0, t0 = self.steps_done(), time.time()
        time.sleep(10)
        s1, t1 = self.steps_done(), time.time()
        self.log("throttle_start", seconds=self.a.throttle_s)
        self.throttle_learners(self.a.throttle_s)
        s2, t2 = self.steps_done(), time.time()
        self.throttle["learner_steps_per_s_before"] = round((s1 - s0) / (t1 - t0), 3)
        self.throttle["learner_steps_per_s_during"] = round((s2 - s1) / (t2 - t1), 3)
        self.log("throttle_end", **self.throttle)

    def kill_learner(self) -> int | None:
        pids = self.learner_pids()
        if not pids:
            return None
        pid = self.rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        self.log("kill_learner", pid=pid)
        return pid

    # --- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.start_ray()
        sampler = threading.Thread(target=self._sample_loop, daemon=True)
        sampler.start()
        try:
            return self._run()
        finally:
            self.stop.set()
            job = getattr(self, "job_proc", None)
            if job is not None and job.poll() is None:  # stopped early (an error, Ctrl-C, SIGTERM): no orphan job
                job.terminate()
                try:
                    job.wait(30)
                except subprocess.TimeoutExpired:
                    job.kill()
            self.stop_ray()

    def _sample_loop(self) -> None:
        while not self.stop.is_set():
            self.sample_rss()
            time.sleep(2)

    def _run(self) -> dict:
        a = self.a
        job = self.launch(resume=False)
        while not self.in_opd():
            if job.poll() is not None:
                raise RuntimeError(f"dopd train stopped before the Draft-OPD phase (see {self.tmp / 'train.log'})")
            time.sleep(1)
        self.log("opd_started")
        planned = 2 + self.steps
        crash_at = int(a.crash_at * planned)  # faults are scheduled by progress, so a slow machine still sees them all
        throttle_at = int(a.throttle_at * planned)
        next_kill = time.time() + self.rng.uniform(0.75, 1.25) * a.kill_every
        next_inject = time.time() + self.rng.uniform(5, 15)
        throttler: threading.Thread | None = None
        crashed = False
        resumed_job = None
        while True:
            current = resumed_job or job
            if current.poll() is not None:
                if current is job and not crashed:
                    raise RuntimeError(
                        f"dopd train exited ({current.returncode}) before the learner kill (see {self.tmp / 'train.log'})"
                    )
                if current is job:  # the crash: the job stopped itself and told us how to resume
                    text = (self.tmp / "train.log").read_text()
                    hint = "dopd train --resume" in text
                    self.log("job_stopped", returncode=current.returncode, resume_hint=hint)
                    if not hint:
                        raise RuntimeError(f"the crashed job did not say how to resume (see {self.tmp / 'train.log'})")
                    resumed_job = self.launch(resume=True)
                    while (
                        not (self.out / "checkpoints" / "crash_resumed_1.json").is_file() and resumed_job.poll() is None
                    ):
                        time.sleep(1)  # faults resume once the new job has placed its actors
                    continue
                break
            now = time.time()
            if now >= next_kill:
                self.kill_actor()
                next_kill = now + self.rng.uniform(0.75, 1.25) * a.kill_every
            if now >= next_inject:
                self.inject()
                next_inject = now + self.rng.uniform(20, 40)
            done = self.steps_done()
            if throttler is None and done >= throttle_at:
                throttler = threading.Thread(target=self._throttle_window, daemon=True)
                throttler.start()
            if not crashed and done >= crash_at and throttler is not None and not throttler.is_alive():
                crashed = self.kill_learner() is not None
            time.sleep(1)
        summary_file = self.out / "summary.json"
        if resumed_job is None or resumed_job.returncode != 0 or not summary_file.is_file():
            raise RuntimeError(f"the resumed job did not finish (see {self.tmp / 'train_resume.log'})")
        return self.report(json.loads(summary_file.read_text()), time.time() - self.t0)

    def report(self, s: dict, wall: float) -> dict:
        planned = s["steps_planned"]
        dropped = {"stale": s["records_dropped_stale"], "full": s["records_dropped_full"]}
        offered = s["records_produced"] + s["records_rejected"]
        accounted = (
            s["records_trained"]
            + sum(dropped.values())
            + s["records_rejected"]
            + s["records_lost_in_flight"]
            + s["records_queued"]
        )
        out = {
            "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
            "minutes_planned": self.a.minutes,
            "wall_s": round(wall, 1),
            "actors": 4,
            "learners": 2,
            "target": "tiny-random-llama",
            "records_produced": s["records_produced"],
            "records_offered": offered,
            "records_trained": s["records_trained"],
            "records_dropped": dropped,
            "records_rejected": s["records_rejected"],
            "records_lost_in_flight": s["records_lost_in_flight"],
            "records_queued_at_end": s["records_queued"],
            "records_trained_twice": s["records_trained_twice"],
            "exactly_once_state_bytes": s["exactly_once_state_bytes"],
            "injected": self.injected,
            "actor_kills": sum(e["event"] == "kill_actor" for e in self.events),
            "actor_restarts": s["actor_restarts"],
            "learner_kills": sum(e["event"] == "kill_learner" for e in self.events),
            "resumes": s["resumes"],
            "final_step": s["steps"],
            "planned_step": planned,
            "queue_peak_bytes": s["queue_peak_bytes"],
            "queue_max_bytes": s["queue_max_bytes"],
            "throttle": self.throttle,
            "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in sorted(self.rss.items())},
            "aims": {
                "zero_trained_twice": s["records_trained_twice"] == 0,
                "every_record_accounted_for": offered == accounted,
                "planned_step_reached": s["steps"] == planned,
                "queue_bytes_within_bound": s["queue_peak_bytes"] <= s["queue_max_bytes"],
                "faults_injected": self.injected["rejected_answers"] == 2 * self.injected["garbage"]
                and s["resumes"] == 1
                and s["actor_restarts"] >= 1,
            },
            "events": self.events,
        }
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--steps-per-minute", type=float, default=80.0, help="learner steps planned per minute of soak")
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--queue-max-bytes", type=int, default=2 * 2**20)
    ap.add_argument("--max-record-bytes", type=int, default=1 * 2**20)
    ap.add_argument(
        "--throttle-at",
        type=float,
        default=0.15,
        help="progress (fraction of the planned steps) where learners are throttled",
    )
    ap.add_argument("--throttle-s", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between rollout-actor kills (+-25%%)")
    ap.add_argument(
        "--crash-at",
        type=float,
        default=0.45,
        help="progress where a learner rank is killed (after the throttle window)",
    )
    ap.add_argument(
        "--num-cpus", type=int, default=8, help="CPUs the soak's Ray head advertises (actors/learners take 1 each)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="under 3 minutes on 2 cores: a 1.5-minute soak with a 20 s throttle"
    )
    a = ap.parse_args()
    from dopd.common.hardware import bench_start

    bench_start(a, dict(minutes=1.5, throttle_s=20.0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the job and the Ray head on SIGTERM too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    report = Soak(a).run()
    brief = {k: v for k, v in report.items() if k != "events"}
    print(json.dumps(brief, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if all(report["aims"].values()) else 1)


if __name__ == "__main__":
    main()
