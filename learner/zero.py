"""The Ray runner's learner rank: the shared `Learner` (learner/learner.py) under a DeepSpeed ZeRO engine.

`make_rank` builds one rank in a torch.distributed group (plain Python: one rank runs in a test process);
`LearnerActor` is the Ray actor around it, which pulls its micro-batches from its own queue shard(s) (records
arriving up to `cluster.max_staleness` policy versions old), or trains the records the driver hands it
(`cluster.rollout=sync`). ZeRO stage 0-3 comes from the config; `learner.deepspeed` is merged into the generated
DeepSpeed config.
"""

from __future__ import annotations

import os
import time

import torch

from dopd.common.config import Config
from dopd.common.errors import RecordError
from dopd.common.models import load_frozen_io

from .learner import Learner
from .optim import make_optimizer, restore_schedule


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


class DeepSpeedEngine:
    """The Ray runner's optimizer step: the drafter under a DeepSpeed ZeRO engine (stage 0-3 from the config) with
    the same AdamW and schedule as the in-process `TorchEngine`; DeepSpeed clips and averages gradients across
    ranks. `optimizer_state` / `load_optimizer_state` move the full (gathered) state per named parameter, so a
    checkpoint does not depend on the world size or on DeepSpeed's own file layout."""

    def __init__(self, module: torch.nn.Module, cfg: Config, world: int):
        import deepspeed

        opt, sched = make_optimizer(module, cfg)
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world)
        )
        self.module = module
        self.zero_stage = cfg.learner.zero_stage
        self.grad_norm = 0.0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The parameter's whole (averaged) gradient between backward and step: gathered from the ZeRO partitions,
        so every rank must call it for the same parameters in the same order."""
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)

    def step(self) -> None:
        self.engine.step()
        g = self.engine.get_global_grad_norm()
        self.grad_norm = float(g) if g is not None else 0.0

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def _inner(self) -> torch.optim.Optimizer:
        """The torch AdamW DeepSpeed steps (ZeRO wraps it and points it at flat fp32 partitions; stage 0 does not)."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer

    def _partitioned(self, p: torch.nn.Parameter) -> bool:
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def optimizer_state(self) -> dict | None:
        """Gathered on every rank (a collective under ZeRO); None before the first step."""
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = self._inner()
        steps = [s["step"] for s in inner.state.values() if "step" in s]
        if not steps:
            return None
        params = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if self._partitioned(p):
                st = {
                    k: safe_get_full_optimizer_state(p, k).detach().cpu().clone().reshape(shape)
                    for k in ("exp_avg", "exp_avg_sq")
                }
            else:
                st = {k: v.detach().cpu().clone() for k, v in inner.state[p].items() if k != "step"}
            params[name] = {"step": steps[0].detach().cpu().clone(), **st}
        return {"params": params, "lr": [g["lr"] for g in inner.param_groups], "scheduler": self.sched.state_dict()}

    def load_optimizer_state(self, blob: dict) -> None:
        """Scatter a full optimizer state into this rank's partitions (every rank calls it)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = self._inner()
        step = next(iter(blob["params"].values()))["step"]
        # the inner optimizer creates its state on its first step: create it now (zeros) for every tensor it steps
        # (ZeRO-3: the flat fp32 partitions, out of its param groups between steps; ZeRO-1/2: the flat partitions;
        # stage 0: the parameters), then fill it
        zero = self.engine.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
            zero, "single_partition_of_fp32_groups", None
        )
        if flats is None:
            flats = [p for g in inner.param_groups for p in g["params"]]
        for flat in flats:
            st = inner.state[flat]
            if not st:
                st.update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(flat),
                    exp_avg_sq=torch.zeros_like(flat),
                )
            st["step"] = step.clone().to(st["step"].dtype)
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2: point each parameter's fragment at the new state
            link()
        for name, p in self.module.named_parameters():
            if name not in blob["params"]:
                continue
            saved = blob["params"][name]
            for k in ("exp_avg", "exp_avg_sq"):
                if self._partitioned(p):
                    safe_set_full_optimizer_state(p, saved[k], k)
                else:
                    inner.state[p][k].copy_(saved[k])
        restore_schedule(self.sched, inner.param_groups, blob["scheduler"])


def make_rank(cfg: Config, rank: int, world: int, master_addr: str, master_port: int, device: str = "cpu") -> Learner:
    """A learner rank under DeepSpeed in a torch.distributed group (gloo on CPU, NCCL on GPU). It holds only the
    drafter plus the target's frozen embedding and head (read straight from the target's safetensors)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )  # Ray gives each rank its own visible GPU(s)
    import deepspeed

    try:  # the shm all-reduce op compiles for a minute on first use and leaves /dev/shm files behind
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:
        pass
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False)
    dev = "cpu" if device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    info, embed, head, hf_config = load_frozen_io(cfg.model.target)
    return Learner(cfg, rank, world, info, hf_config, embed, head, dev, lambda m: DeepSpeedEngine(m, cfg, world))


class LearnerActor:
    """Ray wrapper: one rank; pulls its micro-batches from its own shard(s), or trains the records it is handed.

    A plain class at module level; dopd/fleet.py (LearnerGroup) applies `ray.remote` where it places the ranks, so
    importing this module never imports Ray.
    """

    def __init__(self, cfg_dict: dict, rank: int, world: int, shards: list, device: str):
        from dopd.common.load import config_from_dict

        torch.set_num_threads(max(1, int(os.environ.get("DOPD_LEARNER_THREADS", "1"))))
        self.cfg = config_from_dict(cfg_dict)
        self.shards = shards
        self.rank, self.world, self.device = rank, world, device
        self.learner: Learner | None = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's answer is the torch.distributed master."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def init(self, master_addr: str, master_port: int) -> int:
        self.learner = make_rank(self.cfg, self.rank, self.world, master_addr, master_port, self.device)
        return self.rank

    def opd_step(self, learner_version: int, records: list[bytes] | None = None, timeout_s: float = 600.0) -> dict:
        """Train on a micro-batch: `records` handed over by the driver (cluster.rollout=sync), or pulled from this
        rank's shard(s) (async; a shard's `get` waits inside the shard for records to arrive). Each record is decoded
        and validated here, once; one that fails is refused (reported back to its shard, which counts it as rejected,
        and replaced by the next one), so no input can stop the rank."""
        import ray

        need = self.cfg.learner.micro_batch_size
        recs, refused = [], []
        for b in records or []:
            try:
                recs.append(self.learner.decode(b))
            except RecordError as e:
                refused.append(str(e))
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
            bad = []
            for b in ray.get(shard.get.remote(need - len(recs), learner_version, wait)):
                try:
                    recs.append(self.learner.decode(b))
                except RecordError as e:
                    bad.append(str(e))
            if bad:
                ray.get(shard.refused_by_learner.remote(bad))
                refused += bad
        wait_s = time.perf_counter() - t0
        out = self.learner.opd_step(recs, learner_version)
        out["wait_s"] = wait_s
        out["refused"] = len(refused)
        return out

    def set_teacher(self, box: list) -> int:
        import ray

        return self.learner.set_teacher(ray.get(box[0]))

    def sft_step(self) -> dict:
        return self.learner.sft_step()

    def gather_weights(self):
        return self.learner.gather_weights()

    def spec(self) -> dict:
        return self.learner.spec()

    def vocab_chosen(self) -> bool:
        return self.learner.vocab_chosen

    def training_state(self) -> dict:
        return self.learner.training_state()

    def load(self, weights_box: list, state_box: list) -> int:
        import ray

        self.learner.load(ray.get(weights_box[0]), ray.get(state_box[0]))
        return self.learner.step

    def num_parameters(self) -> int:
        return self.learner.drafter.num_parameters()

    def pid(self) -> int:
        return os.getpid()
