"""The resource plan of a run: what N actors and M learner ranks need, what the machine (or cluster) has, what is left.

Why: without it `dopd train --actors 16 --learners 4` started 16 target copies on 2 cores and 23 GB with no word
(21-22.5 GB used, 1.4 GB left), and Ray was told the machine had as many CPUs as actors. The plan is computed from
the config and the measured machine only (config.json and the safetensors headers, never the weights), so
`dopd train --dry-run` prints it in a second. A plan that cannot fit memory is refused with its numbers and the
largest `--actors` that fits; an oversubscribed CPU plan runs, with one warning, on a thread budget that shares the
cores (torch threads per process = max(1, cores // processes)) and fractional Ray CPUs per process, so that Ray,
told the real CPU count, still places every process.

The byte estimates are upper bounds of what dominates (weights, optimizer moments, KV cache, a per-process base of
torch + transformers + a Ray worker); they are estimates, and the plan says so.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dopd.common.config import Config
from dopd.common.errors import DopdError

GiB = 2**30
MiB = 2**20
# resident size of one worker process before it loads a model: python + torch + transformers (measured 244 MiB on
# this machine) + a Ray core worker and its imports
PROCESS_BASE_BYTES = 400 * MiB
# the driver, raylet, GCS and the other Ray daemons of an embedded Ray (the object store is counted on its own)
RAY_BASE_BYTES = 600 * MiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}
# AdamW under DeepSpeed: fp32 master weights + exp_avg + exp_avg_sq per trainable parameter, and an fp32 gradient
ADAM_STATE_BYTES, GRAD_BYTES, PARAM_BYTES = 12, 4, 4


class PlanRefused(DopdError):
    """The run does not fit the machine: the message has the numbers and the largest --actors that fits."""


@dataclass
class Machine:
    """What the run may use: CPUs (affinity and cgroup quota), memory (available now), GPUs, over `nodes` nodes."""

    cpus: int
    memory_total: int
    memory_available: int
    gpus: int = 0
    nodes: int = 1
    source: str = "this machine"

    @classmethod
    def local(cls) -> Machine:
        return cls(cpus=local_cpus(), memory_total=_meminfo("MemTotal"), memory_available=local_memory(), gpus=_gpus())

    @classmethod
    def from_ray(cls, free_cpus: bool = False) -> Machine:
        """The joined cluster's alive nodes, from Ray's own accounting (CPU, GPU, memory resources). `free_cpus`: the
        CPUs not held now, for a run joining a Ray this process already uses for something else (`dopd serve --learn`:
        the Serve replicas hold theirs; planning over the total would ask for CPUs that are taken)."""
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        res = [n.get("Resources", {}) for n in alive]
        mem = int(sum(r.get("memory", 0) for r in res))
        cpus = sum(r.get("CPU", 0) for r in res)
        if free_cpus:
            cpus = min(cpus, ray.available_resources().get("CPU", 0.0))
        return cls(
            cpus=int(math.floor(cpus + 1e-6)),
            memory_total=mem,
            memory_available=mem,
            gpus=int(sum(r.get("GPU", 0) for r in res)),
            nodes=len(alive),
            source="the Ray cluster (its memory resource)",
        )


def local_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota when there is one."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total if key == "MemTotal" else vm.available
    except ImportError:
        return 0


def local_memory() -> int:
    """Memory available now (MemAvailable), capped by a cgroup v2 memory limit's headroom."""
    avail = _meminfo("MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


# ---------------------------------------------------------------------------------------------------------------
# the target and drafter sizes, from files only


def safetensors_params(path: Path) -> tuple[int, str]:
    """(parameter count, the most common stored dtype) from the headers of the safetensors files in `path`."""
    total, by_dtype = 0, {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            numel = math.prod(v["shape"])
            total += numel
            by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + numel
    if not total:
        raise DopdError(f"no safetensors weights in {path}: cannot size the target")
    return total, max(by_dtype, key=by_dtype.get)


@dataclass
class Sizes:
    """The numbers the plan multiplies: the target's parameters and KV shape, the drafter's parameters."""

    target_params: int
    target_dtype: str  # what the actors hold the target in
    dtype_note: str
    kv_bytes_per_token: int  # all layers, K and V, in target_dtype
    drafter_trainable: int
    drafter_frozen: int  # the frozen embedding / LM head the learner keeps (fp32)
    stored_dtype: str = ""  # what its files hold (loading converts from it); "" = the same as target_dtype


def _run_dtype(cfg: Config, stored: str) -> tuple[str, str]:
    """The dtype the target runs in, without running the dtype probe: `auto` takes its cached decision, else the
    larger (float32)."""
    d = cfg.model.dtype
    if d != "auto":
        return d, "model.dtype"
    if cfg.model.device.startswith("cuda"):
        return "bfloat16", "auto on a GPU"
    try:
        from dopd.common import hardware

        f = hardware._dtype_cache()
        if f.is_file():
            return json.loads(f.read_text())["dtype"], "auto (this machine's cached measurement)"
    except (OSError, ValueError, KeyError):
        pass
    return "float32", "auto, not measured yet: float32 assumed (the larger)"


def sizes(cfg: Config) -> Sizes:
    """Read config.json and the weights' headers (no weights): target and drafter parameter counts."""
    import torch
    from transformers import AutoConfig

    from dopd.common.drafters import build_drafter
    from dopd.common.models import info_from_config, resolve_target

    path = resolve_target(cfg.model.target, quiet=True)
    hf = AutoConfig.from_pretrained(path)
    n, stored = safetensors_params(path)
    dtype, note = _run_dtype(cfg, stored)
    b = DTYPE_BYTES[dtype]
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    kv = hf.num_hidden_layers * 2 * kv_heads * head_dim * b
    info = info_from_config(cfg.model.target, hf)
    # shapes only: no memory, no initialisation cost; a saved drafter's weights land on meta as no-ops, which torch
    # warns about once per tensor: that is what the plan wants, so the warning is silenced here only
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        e = torch.empty(info.vocab_size, info.hidden_size)
        h = e if getattr(hf, "tie_word_embeddings", False) else torch.empty(info.vocab_size, info.hidden_size)
        d = build_drafter(cfg.drafter, info, hf, e, h, placeholder_vocab=True)
    trainable = sum(p.numel() for p in d.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in d.parameters() if not p.requires_grad)
    frozen += info.vocab_size * info.hidden_size * (1 if h is e else 2)
    stored_name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")
    return Sizes(n, dtype, note, kv, trainable, frozen, stored_dtype=stored_name)


# ---------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """Per actor and per learner rank: bytes, threads, Ray CPUs; the totals against the machine; the verdict."""

    runner: str
    actors: int
    learners: int
    zero_stage: int
    machine: Machine
    sizes: Sizes
    actor_target_bytes: int
    actor_kv_bytes: int
    actor_drafter_bytes: int
    actor_bytes: int
    learner_drafter_bytes: int
    learner_optimizer_bytes: int
    learner_bytes: int
    fixed_bytes: int  # Ray daemons + the object store (Ray runner), or nothing (in-process)
    need_bytes: int
    processes: int
    threads: int  # torch threads per process
    actor_cpus: float  # Ray CPUs each actor requests
    learner_cpus: float  # Ray CPUs each learner rank requests (what it uses: its threads, or its share)
    oversubscribed: bool
    fits: bool
    max_actors: int  # the largest --actors that fits memory with these learners
    notes: list[str] = field(default_factory=list)

    @property
    def left_bytes(self) -> int:
        return self.machine.memory_available - self.need_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "left_bytes": self.left_bytes}

    def warning(self) -> str | None:
        """The one warning of an oversubscribed plan (None when every process has a core)."""
        if not self.oversubscribed:
            return None
        return (
            f"dopd: warning: {self.processes} processes ({self.actors} actors + {self.learners} learner ranks) share "
            f"{self.machine.cpus} CPUs: each gets {self.threads} torch thread(s) and {self.actor_cpus:g} Ray CPU; "
            f"the run will be slower per process than with fewer (at most {self.machine.cpus} processes keep one core each)"
        )

    def refusal(self) -> str:
        m = self.machine
        fit = (
            f"the largest --actors that fits with --learners {self.learners} is {self.max_actors}"
            if self.max_actors >= 1
            else f"not even 1 actor fits with --learners {self.learners}: use fewer learners or a smaller target"
        )
        return (
            f"the plan needs {_gb(self.need_bytes)} of memory but {m.source} has {_gb(m.memory_available)} available "
            f"({self.actors} actors x {_gb(self.actor_bytes)} + {self.learners} learner ranks x {_gb(self.learner_bytes)}"
            f" + {_gb(self.fixed_bytes)} Ray and object store); {fit} (dopd train --dry-run shows the plan)"
        )

    def render(self) -> str:
        """The plan as the lines `dopd train` prints at start."""
        m, s = self.machine, self.sizes
        where = f"{m.nodes} node(s), {m.source}"
        verdict = (
            f"the largest --actors that fits with {self.learners} learner rank(s): {self.max_actors}"
            if self.runner == "ray"
            else "one process holds the target, the rollout copy and the learner"
        )
        lines = [
            f"plan: {self.runner} runner, {self.actors} rollout actor(s), {self.learners} learner rank(s)"
            + (f" (ZeRO-{self.zero_stage})" if self.runner == "ray" else ""),
            f"  have      {where}: {m.cpus} CPUs, {m.gpus} GPUs, {_gb(m.memory_available)} memory available"
            f" of {_gb(m.memory_total)}",
            f"  target    {s.target_params / 1e6:.1f}M params in {s.target_dtype}: {s.dtype_note}",
            f"  drafter   {s.drafter_trainable / 1e6:.2f}M trainable params, {s.drafter_frozen / 1e6:.1f}M frozen",
            f"  per actor {_gb(self.actor_bytes)}: target {_gb(self.actor_target_bytes)}"
            + (f" (loading from {s.stored_dtype})" if s.stored_dtype and s.stored_dtype != s.target_dtype else "")
            + f", KV cache "
            f"{_gb(self.actor_kv_bytes)}, drafter {_gb(self.actor_drafter_bytes)}, process {_gb(PROCESS_BASE_BYTES)};"
            f" {self.threads} thread(s), {self.actor_cpus:g} Ray CPU",
            f"  per rank  {_gb(self.learner_bytes)}: drafter {_gb(self.learner_drafter_bytes)}, AdamW + gradients "
            f"{_gb(self.learner_optimizer_bytes)}"
            + (f" (ZeRO-{self.zero_stage} over {self.learners})" if self.runner == "ray" else "")
            + f", process {_gb(PROCESS_BASE_BYTES)}; {self.threads} thread(s), {self.learner_cpus:g} Ray CPU",
            f"  need      {_gb(self.need_bytes)} (+ {_gb(self.fixed_bytes)} Ray daemons and object store included);"
            f" left {_gb(self.left_bytes)}; CPUs {'oversubscribed' if self.oversubscribed else 'ok'} "
            f"({self.processes} processes on {m.cpus} CPUs)",
            f"  verdict   {'fits' if self.fits else 'REFUSED: does not fit memory'}; {verdict} (estimates: weights,"
            " optimizer, KV cache, process base)",
        ]
        return "\n".join(lines + [f"  note      {n}" for n in self.notes])


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= 0.1 * GiB else f"{b / MiB:.0f} MiB"


def _share(cpus: int, processes: int) -> float:
    """Each process's fractional Ray CPU when `processes` share `cpus`: rounded down to Ray's 1e-4 precision so
    that the bundles' sum never exceeds the real count."""
    return math.floor(cpus / processes * 1e4) / 1e4


def make_plan(cfg: Config, machine: Machine, sz: Sizes | None = None) -> Plan:
    """The plan for a resolved config on `machine` (`sz`: the sizes, read from the target's files when None)."""
    sz = sz or sizes(cfg)
    c, ray_runner = cfg.cluster, cfg.runner == "ray"
    N, M = (c.actors, c.learners) if ray_runner else (1, 1)
    stage = cfg.learner.zero_stage if ray_runner else 0
    tb = DTYPE_BYTES[sz.target_dtype]
    rows = cfg.rollout.batch_size
    ctx = (
        cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) + cfg.eval_block_size + 1
    )
    # loading converts the stored weights to the run dtype: both copies are resident at once, and every actor loads at
    # the start together (measured on SmolLM2 stored in float32, run in bf16: 1.27-1.6 GiB per actor while loading)
    stored = sz.stored_dtype or sz.target_dtype
    actor_target = sz.target_params * (tb + (DTYPE_BYTES[stored] if stored != sz.target_dtype else 0))
    actor_kv = rows * ctx * sz.kv_bytes_per_token
    actor_drafter = sz.drafter_trainable * tb
    actor = actor_target + actor_kv + actor_drafter + PROCESS_BASE_BYTES
    # learner rank: fp32 weights (trainable; ZeRO-3 partitions them), frozen fp32 embedding / head, gradients
    # (partitioned from ZeRO-2) and AdamW's master weights and moments (partitioned from ZeRO-1)
    T = sz.drafter_trainable
    div = lambda k: M if stage >= k else 1  # noqa: E731
    learner_drafter = T * PARAM_BYTES // div(3) + sz.drafter_frozen * 4
    learner_opt = T * GRAD_BYTES // div(2) + T * ADAM_STATE_BYTES // div(1)
    learner = learner_drafter + learner_opt + PROCESS_BASE_BYTES
    if ray_runner:
        fixed = RAY_BASE_BYTES + (c.object_store_memory if not c.address else 0)
        need = N * actor + M * learner + fixed
        processes = N + M
    else:  # one process holds the target, the rollout copy and the learner: one process base
        fixed = 0
        need = actor + learner - PROCESS_BASE_BYTES
        processes = 1
    cpus = max(1, machine.cpus)
    threads = max(1, cpus // processes)
    learner_want = c.learner_num_cpus or 1.0  # a rank reserves what it uses: at least its one thread
    oversubscribed = ray_runner and N * c.actor_num_cpus + M * learner_want > cpus
    if not ray_runner:
        actor_cpus = learner_cpus = 0.0
    elif oversubscribed:
        actor_cpus = learner_cpus = _share(cpus, processes)
    else:
        actor_cpus, learner_cpus = c.actor_num_cpus, max(learner_want, float(min(threads, cpus)))
        if N * actor_cpus + M * learner_cpus > cpus:
            learner_cpus = learner_want
    avail = machine.memory_available
    per_actor_room = avail - M * learner - fixed
    max_actors = max(0, int(per_actor_room // actor)) if ray_runner else (1 if need <= avail else 0)
    notes = []
    if machine.nodes > 1:
        notes.append("memory is the cluster's total: a node still needs room for what Ray places on it")
    return Plan(
        runner=cfg.runner, actors=N, learners=M, zero_stage=stage, machine=machine, sizes=sz,
        actor_target_bytes=actor_target, actor_kv_bytes=actor_kv, actor_drafter_bytes=actor_drafter,
        actor_bytes=actor, learner_drafter_bytes=learner_drafter, learner_optimizer_bytes=learner_opt,
        learner_bytes=learner, fixed_bytes=fixed, need_bytes=need, processes=processes, threads=threads,
        actor_cpus=actor_cpus, learner_cpus=learner_cpus, oversubscribed=oversubscribed, fits=need <= avail,
        max_actors=max_actors, notes=notes,
    )  # fmt: skip


def check(plan: Plan) -> None:
    """Refuse a plan that does not fit memory (PlanRefused, with the numbers)."""
    if not plan.fits:
        raise PlanRefused(plan.refusal())


def thread_env(plan: Plan) -> dict[str, str]:
    """The environment that gives every actor and learner rank its share of the cores."""
    t = str(plan.threads)
    return {"DOPD_ACTOR_THREADS": t, "DOPD_LEARNER_THREADS": t, "OMP_NUM_THREADS": t}
