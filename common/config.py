"""Typed run configuration: one dataclass per section, YAML plus `section.key=value` overrides.

The defaults are the small CPU budget `make run` uses (SmolLM2-135M, minutes on a 2-core machine); experiments and
real runs override them (see experiments/ presets and deploy/kuberay/rayjob.yaml).

Why typed: a misspelt key in a long training run should fail at start-up, not silently fall back to a default.
Every key that is not a field is an error that names the key (and the nearest real key); every value is coerced
to the field's type or rejected with the field's name. The in-process runner and the Ray runner read the same
`Config`, so a YAML file moves between them unchanged (`runner=local|ray`).

Defaults that depend on other keys (the drafter kind's recipe, the objective's, the runner's) are resolved once, at
load (`dopd.common.load.resolve`, which reads the kind, objective and recipe registries; this module
imports none of them): the resolved config is what a run records in config.yaml and what every module reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    """The target model that drafts are verified against."""

    target: str = "smollm2-135m"  # alias | local HF directory | hub id
    # auto: bf16 where the device computes it natively (a GPU with bf16; a CPU with AMX-BF16 or AVX512-BF16 where a
    # micro-benchmark of the decode matmuls, run once per machine and cached under DOPD_CACHE, finds bf16 faster),
    # else float32 (the exactness reference); the run's first lines say which and why; the target, its features and
    # the drafting copy run in it, the learner computes in it with fp32 master weights
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"  # cpu | cuda | cuda:N
    # the engine's target forward: "lean" (fused, prepacked weights; Llama-family), "hf" (the Hugging Face modules,
    # the reference), "auto" (lean where the architecture has it)
    forward: Literal["auto", "lean", "hf"] = "auto"
    # the lean forward's decode and verification steps through torch.compile (inductor C++/OpenMP on CPU with
    # frozen prepacked weights, CUDA graphs on GPU; dynamic shapes; kernels cached under DOPD_CACHE/inductor): "on",
    # "off", or "auto" (on where a measured check on this machine, target and dtype finds it faster; cached)
    compile: Literal["auto", "on", "off"] = "off"


@dataclass
class DrafterConfig:
    """The draft model being trained."""

    # a registered drafter kind (common/drafters/): eagle3 | dflash | dvi (self-speculative: the target's first k
    # layers + a low-rank head)
    kind: str = "eagle3"
    init: str | None = None  # path of a saved drafter to start from; None = fresh weights
    # transformer layers of the drafter
    num_layers: int = 1
    feature_layers: list[int] | None = None  # indices into the target's hidden_states; None = the kind's default
    draft_vocab_size: int | None = None  # None = the full target vocabulary (frozen target head)
    train_lm_head: bool = False  # with a reduced vocabulary the head is the drafter's own and always trained
    # DFlash: train the MASK input vector (dopd's learned mask); false = a fixed vector, the embedding row of
    # drafter.mask_token_id (or the mean embedding row), as the official [docs/recipes.md R8] DFlash drafter's frozen embedding gives it
    train_mask: bool = True
    intermediate_size: int | None = None  # None = the target's
    mask_token_id: int | None = None  # the MASK input token of a parallel kind (DFlash, P-EAGLE); None = its default
    lora_rank: int = 16  # DVI only: rank r of the head's low-rank term gamma * A B (A [V, r], B [r, H])
    lora_gamma: float = 1.0  # DVI only: gamma


@dataclass
class DataConfig:
    """Prompt sets and the train / held-out split."""

    prompts: str = "champ"  # humaneval | champ | champ-problems | a conversation file (.jsonl, .json, .parquet, .arrow) or saved dataset dir
    eval_prompts: str | None = None  # None = a held-out split of `prompts`
    num_eval: int = 16  # held-out groups (a conversation, a champ problem: all of its turns), never trained on
    num_train: int | None = None  # cap on training prompts; None = all the rest
    seed: int = 0  # the split's seed (recorded next to every checkpoint)
    # the longest context (prompt) in tokens; longer ones follow data.too_long
    max_prompt_tokens: int = 384
    # which training prompts OPD rounds roll out: "all"; "after_sft" = only those the warm-up (the first
    # sft.num_prompts) did not answer, prompts new to the drafter (experiments); "sft" = only the warm-up's, whose
    # target text is cached, so a round costs drafter forwards only (make run)
    rollout_prompts: Literal["all", "after_sft", "sft"] = "all"
    # with rollout_prompts=after_sft: skip this many more (an experiment's seeds roll out disjoint prompt samples)
    rollout_skip: int = 0
    # the target text a training example is trained on: "regenerate" = the target's greedy answer to its context
    # (decoded once, cached); "as_is" = the dataset's own answer, teacher-forced (one prefill, no decoding)
    answers: Literal["regenerate", "as_is"] = "regenerate"
    # a context over max_prompt_tokens (or an as_is answer over max_answer_tokens): "truncate" drops the oldest
    # turns (an answer is cut), "skip" drops the example; both are counted in split.json and `dopd data inspect`
    too_long: Literal["truncate", "skip"] = "truncate"
    max_answer_tokens: int | None = None  # as_is: the longest answer teacher-forced; None = rollout.max_new_tokens
    hf_split: str | None = None  # a saved DatasetDict's split to read; None = "train", or its only split


@dataclass
class RolloutConfig:
    """Target-assisted speculative rollout (also the eval engine's defaults)."""

    block_size: int = 4  # K draft tokens per verification step
    # sampling temperature of rollouts (0 = greedy: the target's greedy text, re-segmented)
    temperature: float = 0.0
    # nucleus sampling of rollouts at T > 0 (1 = off)
    top_p: float = 1.0
    # answer tokens per rollout (the target's greedy answers are this long at most)
    max_new_tokens: int = 128
    batch_size: int = 4  # sequences decoded together (per actor)
    topk: int = 16  # target top-k kept per draft position in records
    # where rollout prompts come from: "prompts" = the run's prompt set (data.prompts); "traffic" = the requests a
    # `dopd serve --learn` answered (prompt + the served answer, re-segmented by the current drafter; dopd/traffic.py)
    source: Literal["prompts", "traffic"] = "prompts"
    # rollout.source=traffic: served texts waiting for the rollout actors, at most; the oldest is dropped (counted)
    traffic_buffer: int = 4096
    # "auto": at T = 0 the target's greedy text is decoded once (cached) and the current drafter re-segments it
    # (common/resegment.py), at T > 0 the engine decodes; "engine": always the engine (the slow reference path)
    path: Literal["auto", "engine"] = "auto"


@dataclass
class ReplayConfig:
    """Where the trained blocks start. The official [docs/recipes.md R1] Draft-OPD code trains the rollout's own verification blocks,
    re-run with the current weights, and drafts nothing a second time; everything else here is an ablation."""

    # "rollout": the rollout's block starts (official [docs/recipes.md R1, R9]); "shuffled": the paper's random-anchor ablation (the same
    # multiset of segment lengths shuffled over the response, for the accepted stream; the rejected stream stays at
    # the true block starts)
    anchors: Literal["rollout", "shuffled"] = "rollout"
    # extra blocks drafted again from chosen positions and scored by the target (dopd's first-wave mechanism, kept
    # as an option): "error" (the committed prefix before each rejected token), "random" (as many, uniformly over
    # the answer), "all" (every answer position), "none" (official [docs/recipes.md R2])
    extra: Literal["none", "error", "random", "all"] = "none"
    num_blocks: int = 1  # R extra blocks per extra anchor
    temperature: float = 0.0  # 0 = greedy extra drafts
    # cap on extra anchors per sequence (replay.extra)
    max_anchors_per_seq: int = 64


@dataclass
class LossConfig:
    """Acceptance-aware distillation (Draft-OPD) and the SFT objectives.

    A None field is resolved at load (`common/load.py`) from the objective's defaults, then the drafter kind's
    official [docs/recipes.md R4, R5, R10] recipe (each kind's `default_loss`): DFlash: blocks at the rollout's block starts, accepted stream =
    Bernoulli forward KL on the target's token, rejected stream = k3 on the drafted tokens (lambda 1); EAGLE-3: full
    training-time test over every response position (soft cross-entropy to the target, 0.8^step), rejected stream
    off (lambda 0).
    """

    # a named recipe (common/recipes.py: official-2605, official-tv, official-eagle3, dopd-2511): its settings fill
    # every key the config leaves unset, at load; a key set anyway is a deviation (logged at the start of a run)
    recipe: str | None = None
    # what the learner optimises on rollout records, a registered objective (learner/objectives/): "opd" =
    # Draft-OPD's streams (below); "dvi" = DVI's online schedule (section `dvi`: KL, then reward-masked CE + policy
    # gradient, on every drafted position up to and including the first rejection); "expected_length" = Bebop's
    # end-to-end objective (the expected accepted length of a block under rejection sampling, maximised; T = 1
    # rollouts). None = the drafter kind's (dvi for the dvi kind, else opd)
    objective: str | None = None
    # expected_length: "path" = sum_j prod_{i<j} min(1, p(d_i)/q(d_i)) (1 - TV_j) along the drafted path (unbiased);
    # "product" = sum_j prod_{i<=j} (1 - TV_i) (exact for K = 1, or when TV does not depend on the drafted prefix)
    e2e_estimator: Literal["path", "product"] = "path"
    # path: add the score-function part of the gradient (the drafts are sampled from q); off = the formula's own
    # gradient only, which is biased (kept for the comparison in tests/test_methods_losses.py)
    e2e_score: bool = True
    response: Literal["blocks", "ttt"] | None = None  # accepted stream: verification blocks | TTT at every position
    acc_divergence: Literal["fkl", "tv", "jsd", "bernoulli"] | None = None  # bernoulli: on the target's top-1 token
    rej_divergence: Literal["k3", "bernoulli", "fkl", "tv", "jsd"] = "k3"  # k3 / bernoulli: on the drafted token
    # k3's form: "verl" = verl's kl_penalty (delta = clip(log p - log q, +-20), k3 = clip(e^delta - delta - 1, -10, 10),
    # no floor on its inputs: a draft with log p - log q < ~-11 gets no gradient); "floored" = both log-probs
    # floored at -10 first, so every rejected token is pushed down (dopd-2511)
    k3: Literal["verl", "floored"] = "verl"
    # floor on both log-probs of the Bernoulli forward KL (official [docs/recipes.md R4] -10: a drafter log q below it gets no gradient)
    log_floor: float = -10.0
    # the rejected stream keeps only each block's first rejected token, weight 1 (no decay): no label after a wrong
    # draft (the official [docs/recipes.md R11] `rejected_draft_first_token_only`)
    rej_first_only: bool = False
    # the accepted stream's share of the joint mean's denominator: "response_tokens" = every answer token of the
    # batch, supervised or not (the official [docs/recipes.md R3] code: verl's loss_mask = response_mask); "supervised" = the stream's
    # own position weights
    acc_denominator: Literal["response_tokens", "supervised"] = "response_tokens"
    # train block positions past the record's committed answer (its greedy lookahead); the official [docs/recipes.md R1] segments end
    # at the response's end
    train_past_end: bool = False
    # OPD targets: "topk" = the records' top-k (+ tail bucket); "full" = the exact full-vocabulary distribution,
    # from the target's final hidden state the records carry (the learner applies the frozen head)
    targets: Literal["topk", "full"] = "topk"
    # weight of the accepted stream in the joint token mean
    lambda_acc: float = 1.0
    # weight of the rejected stream; None = the recipe's (DFlash 1, EAGLE-3 0)
    lambda_rej: float | None = None
    # per-position decay of the block objective: position j weighs gamma^(j - offset)
    gamma: float = 0.8
    # offset 1 = the block's first draft position (official [docs/recipes.md R3]: the first rejected token already weighs
    # gamma^accepted); "rejection" = offset 1 at the first rejected position (dopd's first-wave choice)
    gamma_offset: Literal["block", "rejection"] = "block"
    # the first rejected position is also distilled toward the target (accepted-stream divergence), as the official [docs/recipes.md R3]
    # code does: pull the target's token up where the rejected stream pushes the drafter's down
    acc_at_first_rejection: bool = True
    # per-position loss clamp of the block objective (official [docs/recipes.md R6]: 10); None = off
    clamp: float | None = 10.0
    # SFT loss: kl = soft cross-entropy to the target's top-k, ce = the target's token, both = their sum
    sft_objective: Literal["kl", "ce", "both"] = "kl"
    ttt_depth: int | None = None  # EAGLE-3 training-time-test unroll depth; None = block_size
    ttt_step_weight: float = 0.8  # weight of unroll step j is ttt_step_weight**(j-1)
    dflash_decay: float | None = 7.0  # DFlash SFT position weight exp(-(k-1)/decay); None = flat
    # DFlash SFT: block starts sampled per sequence (all when fewer)
    dflash_anchors_per_seq: int = 64
    # what the actor records for the objective, declared by it (`Objective.records`) and filled at load; a value
    # set anyway must equal the declaration: "blocks" = the rollout's verification blocks feed the accepted stream,
    # "teacher" = the target's per-position top-k + tail along the text, "hidden" = its final hidden state along the
    # answer, "scored" = the drafted tails after a rejection scored by the target
    records: list[Literal["blocks", "teacher", "hidden", "scored"]] | None = None


@dataclass
class DVIConfig:
    """DVI's online schedule (arXiv 2510.05421), used by `loss.objective=dvi`.

    Samples: every drafted position up to and including a block's first rejection (reward 1 accepted, 0 at the
    first rejection), with the target's top-k (+ tail) there. Phase "kl" (learner steps < rl_start_step): forward
    KL to the target. Phase "rl": kl_weight * KL + ce_weight * reward-masked cross-entropy (-r log q(d)) +
    pg_weight * on-policy policy gradient (-(r - b) log q(d), b = the batch's mean reward: a baseline that leaves
    the gradient unbiased and lowers its variance). Steps are counted over the whole run (a warm-up included).
    """

    rl_start_step: int | None = None  # the first learner step of the RL phase; None = KL only
    kl_weight: float = 0.0  # KL's weight in the RL phase (1 in the KL phase)
    # weight of the reward-masked cross-entropy in the RL phase
    ce_weight: float = 1.0
    # weight of the policy-gradient term in the RL phase
    pg_weight: float = 1.0
    # policy-gradient baseline: the batch's mean reward, or none
    baseline: Literal["batch_mean", "none"] = "batch_mean"


@dataclass
class SFTConfig:
    """Supervised warm-up / baseline on target-regenerated answers."""

    # SFT learner steps before the first OPD round (mode=opd)
    warmup_steps: int = 240
    num_prompts: int | None = 512  # training prompts the target answers once (cached on disk)
    # answer tokens the target writes per SFT prompt (data.answers=regenerate)
    max_new_tokens: int = 128
    # must be 0: SFT data is the target's greedy text (cached)
    temperature: float = 0.0
    sequences: str | None = None  # JSONL of target-written sequences to train on instead (e.g. an OPD run's rollouts)


@dataclass
class LearnerConfig:
    """Optimizer, schedule and the learner loop."""

    # peak learning rate (AdamW)
    lr: float = 1e-3
    # AdamW weight decay
    weight_decay: float = 0.0
    # AdamW betas
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # gradient-norm clip
    grad_clip: float = 1.0
    # linear learning-rate warm-up steps (at the start of each phase: SFT, then Draft-OPD)
    warmup_steps: int = 10
    # after the warm-up: "cosine" down to lr x min_lr_ratio at each phase's last step, or "constant"
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # the cosine's floor, as a share of learner.lr
    opd_lr: float | None = None  # the Draft-OPD phase's peak learning rate (None = lr)
    # a run that starts the Draft-OPD phase from another run's checkpoint (resume_from at its last SFT step):
    # "continue" its AdamW moments, or start them "fresh" (zero, step 0), as the official [docs/recipes.md R13, R16] pipeline does by running
    # OPD as a separate job from a saved drafter (docs/recipes.md R13: the e81a8bc script starts from a model directory)
    opd_optimizer: Literal["continue", "fresh"] = "continue"
    micro_batch_size: int = 2  # sequence records per optimizer step (per learner rank)
    steps: int = 24  # optimizer steps after warm-up (opd mode) or in total (sft mode)
    refresh_every: int = 4  # learner steps between drafter refreshes of the rollout copy (= publish_every)
    eval_every: int = 40  # learner steps of this run between held-out evaluations (counted from where it started)
    # further steps (global, counted from step 0) to evaluate at, e.g. log-spaced points of a learning curve
    eval_at: list[int] = field(default_factory=list)
    checkpoint_every: int = 40  # learner steps between checkpoints (the last two are kept)
    zero_stage: Literal[0, 1, 2, 3] = 2  # how the Ray runner's ranks partition optimizer state (the same update)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged into the Ray runner's DeepSpeed config
    flops_budget: float | None = None  # also stop once the counted learner FLOPs reach this


@dataclass
class EvalConfig:
    """Held-out acceptance length."""

    # held-out prompts evaluated (at most the held-out split's)
    num_prompts: int = 16
    # answer tokens per held-out prompt
    max_new_tokens: int = 128
    block_size: int | None = None  # None = rollout.block_size
    # 0 = greedy tau (exact, simulated); > 0 = rejection sampling with the engine
    temperature: float = 0.0
    # at T = 0: exact tau from the cached greedy text with drafter forwards only (common/resegment.py); false =
    # decode with the engine (also the path at T > 0)
    simulate: bool = True


@dataclass
class ClusterConfig:
    """How the run is placed. The in-process runner is one rollout worker and one learner rank in synchronous rounds:
    actors, learners and shards resolve to 1 and rollout to sync there (anything else is an error); the other keys
    place the Ray runner's processes."""

    address: str | None = None  # None = an embedded local Ray, unless `dopd cluster up` wrote one
    actors: int | None = None  # rollout actors; None = 2 on Ray, 1 in-process
    learners: int | None = None  # learner ranks (DeepSpeed ZeRO on Ray); None = 2 on Ray, 1 in-process
    shards: int | None = None  # None = one per learner rank
    # "async": actors roll out continuously, records are trained up to `max_staleness` policy versions old (Ray's
    # default); "sync": each round of refresh_every steps trains records the version right before it rolled out,
    # 0 versions stale (the official [docs/recipes.md R7] code's schedule; the in-process runner's only one). None = the runner's
    rollout: Literal["async", "sync"] | None = None
    # Ray CPUs per rollout actor (a plan with more processes than cores asks for an equal share instead: dopd/plan.py)
    actor_num_cpus: float = 1.0
    # Ray GPUs per rollout actor
    actor_num_gpus: float = 0.0
    # Ray CPUs per learner rank (0 = what it uses: its threads, or its share of the cores when oversubscribed)
    learner_num_cpus: float = 0.0
    # Ray GPUs per learner rank
    learner_num_gpus: float = 0.0
    # bytes a queue shard holds before queue_policy applies
    queue_max_bytes: int = 256 * 2**20
    # a full shard: block (the actor waits: backpressure), drop_oldest or drop_newest
    queue_policy: Literal["block", "drop_oldest", "drop_newest"] = "block"
    max_staleness: int = 4  # records older than this many policy versions are dropped
    # a larger experience record is rejected
    max_record_bytes: int = 64 * 2**20
    # times Ray restarts a crashed rollout actor
    max_actor_restarts: int = 3
    # bytes of the embedded local Ray's object store
    object_store_memory: int = 512 * 2**20
    master_port: int | None = None  # torch.distributed rendezvous port for the learner group; None = free port
    placement_timeout_s: float = 120.0  # how long to wait for the cluster to fit the actors and learners


@dataclass
class MetricsConfig:
    """The job's metrics: the Ray runner's Prometheus endpoint, and TensorBoard / W&B under the same names
    (dopd/sinks.py; both runners)."""

    # serve Prometheus /metrics; None = on for the Ray runner (the in-process runner serves none)
    enabled: bool | None = None
    # address /metrics binds (loopback unless you mean otherwise)
    host: str = "127.0.0.1"
    port: int = 9400  # 0 = any free port (written to summary.json)
    linger_s: float = 0.0  # keep /metrics up this long after the job ends (a last scrape)
    tensorboard: bool = False  # also write TensorBoard event files to <out_dir>/tensorboard (the Prometheus names)
    # also log an offline W&B run to <out_dir>/wandb (needs the wandb package; `wandb sync` uploads it)
    wandb: bool = False
    # every OPD step: the official [docs/recipes.md R14] replay-mismatch split, KL(q || p) over the full vocabulary on matched / accepted /
    # first-rejected / post-rejection block positions (records then carry the target's final hidden state: docs/scale.md)
    replay_kl: bool = True


@dataclass
class Config:
    """A whole run. `mode` picks the schedule (SFT only, or an SFT warm-up then Draft-OPD); `runner` where it runs."""

    # sft = supervised training only; opd = SFT warm-up (sft.warmup_steps), then Draft-OPD rounds
    mode: Literal["sft", "opd"] = "opd"
    runner: Literal["local", "ray"] = "local"  # in one process, or on Ray (dopd train --actors N sets ray)
    # a checkpoint directory (this run's or another's, either runner's) to continue from: drafter, optimizer,
    # schedule, step, data cursors; the run writes its own out_dir and counts eval_every from that step
    resume_from: str | None = None
    # seed of weights, data order and sampling
    seed: int = 0
    # run directory: config, metrics, checkpoints, the trained drafter (dopd train --out)
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dvi: DVIConfig = field(default_factory=DVIConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _resolve_runner(self) -> None:
        c, local = self.cluster, self.runner == "local"
        if local:
            for key in ("actors", "learners", "shards"):
                v = getattr(c, key)
                if v is not None and v != 1:
                    raise ConfigError(
                        f"cluster.{key}={v}: the in-process runner is one rollout worker and one learner rank (run on Ray for more: runner=ray, or dopd train --actors N)"
                    )
            if c.rollout == "async":
                raise ConfigError(
                    "cluster.rollout=async needs the Ray runner: the in-process runner rolls out in synchronous rounds"
                )
            if self.metrics.enabled:
                raise ConfigError(
                    "metrics.enabled=true: the in-process runner serves no /metrics endpoint (the Ray runner does)"
                )
            if self.learner.deepspeed:
                raise ConfigError(
                    "learner.deepspeed configures the Ray runner's DeepSpeed engine; the in-process runner has none"
                )
        c.actors = c.actors if c.actors is not None else 1 if local else 2
        c.learners = c.learners if c.learners is not None else 1 if local else 2
        c.rollout = c.rollout or ("sync" if local else "async")
        if self.metrics.enabled is None:
            self.metrics.enabled = not local

    def validate(self) -> Config:
        """Cross-field checks that a single field's type cannot express (on a resolved config)."""
        r = self.rollout
        if r.block_size < 1:
            raise ConfigError(f"rollout.block_size must be >= 1 (got {r.block_size}): K is the number of draft tokens")
        if self.eval.block_size is not None and self.eval.block_size < 1:
            raise ConfigError(f"eval.block_size must be >= 1 (got {self.eval.block_size})")
        if r.temperature < 0 or self.replay.temperature < 0 or self.eval.temperature < 0:
            raise ConfigError("temperatures must be >= 0 (0 = greedy)")
        if not 0 < r.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1] (got {r.top_p})")
        if r.topk < 1:
            raise ConfigError(f"rollout.topk must be >= 1 (got {r.topk})")
        if r.batch_size < 1 or r.max_new_tokens < 1:
            raise ConfigError("rollout.batch_size and rollout.max_new_tokens must be >= 1")
        if r.traffic_buffer < 1:
            raise ConfigError(f"rollout.traffic_buffer must be >= 1 (got {r.traffic_buffer})")
        if r.source == "traffic":
            if self.runner != "ray" or self.cluster.rollout != "async":
                raise ConfigError(
                    "rollout.source=traffic learns from a running `dopd serve --learn`: it needs the Ray runner with"
                    f" cluster.rollout=async (got runner={self.runner}, cluster.rollout={self.cluster.rollout})"
                )
            if r.path != "auto" or r.temperature > 0:
                raise ConfigError(
                    "rollout.source=traffic re-segments the served answers with the current drafter: it needs"
                    f" rollout.path=auto and rollout.temperature=0 (got path={r.path}, temperature={r.temperature})"
                )
        if not 0 < self.loss.gamma <= 1:
            raise ConfigError(f"loss.gamma must be in (0, 1] (got {self.loss.gamma})")
        if self.replay.num_blocks < 1:
            raise ConfigError(f"replay.num_blocks must be >= 1 (got {self.replay.num_blocks})")
        if self.replay.num_blocks > 1 and self.replay.temperature <= 0:
            raise ConfigError(
                "replay.num_blocks > 1 needs replay.temperature > 0 (greedy replay blocks would be identical)"
            )
        if self.data.rollout_skip < 0 or (self.data.rollout_skip and self.data.rollout_prompts != "after_sft"):
            raise ConfigError(
                f"data.rollout_skip must be >= 0 and needs data.rollout_prompts=after_sft (got {self.data.rollout_skip}, {self.data.rollout_prompts})"
            )
        if self.learner.micro_batch_size < 1:
            raise ConfigError("learner.micro_batch_size must be >= 1")
        if self.learner.opd_lr is not None and not self.learner.opd_lr > 0:
            raise ConfigError(f"learner.opd_lr must be > 0 or null (got {self.learner.opd_lr})")
        if self.learner.opd_optimizer == "fresh" and self.mode == "opd" and self.resume_from is None:
            raise ConfigError(
                "learner.opd_optimizer=fresh applies to a Draft-OPD run that starts from another run's checkpoint at its last SFT"
                " step (resume_from=...): within one run both phases step one optimizer (mode=sft runs ignore the key, like opd_lr)"
            )
        if not 0.0 <= self.learner.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"learner.min_lr_ratio must be in [0, 1] (got {self.learner.min_lr_ratio}): the cosine's floor as a share of learner.lr"
            )
        if self.learner.refresh_every < 1:
            raise ConfigError("learner.refresh_every must be >= 1")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self.learner, key) < 1:
                raise ConfigError(f"learner.{key} must be >= 1 (got {getattr(self.learner, key)})")
        if any(not isinstance(s, int) or s < 1 for s in self.learner.eval_at):
            raise ConfigError(f"learner.eval_at must list steps >= 1 (got {self.learner.eval_at})")
        if self.cluster.actors < 1 or self.cluster.learners < 1:
            raise ConfigError(
                f"cluster.actors and cluster.learners must be >= 1 (got {self.cluster.actors}, {self.cluster.learners})"
            )
        if self.cluster.shards is not None and self.cluster.shards < 1:
            raise ConfigError("cluster.shards must be >= 1")
        if self.drafter.num_layers < 1:
            raise ConfigError("drafter.num_layers must be >= 1")
        lc = self.loss
        if lc.response == "ttt" and self.replay.anchors == "shuffled":
            raise ConfigError(
                "replay.anchors=shuffled moves the accepted stream's blocks, but loss.response=ttt trains every position (no blocks): use loss.response=blocks"
            )
        if lc.clamp is not None and lc.clamp <= 0:
            raise ConfigError(f"loss.clamp must be > 0 or null (got {lc.clamp})")
        if not lc.log_floor < 0:
            raise ConfigError(f"loss.log_floor must be a negative log-probability (got {lc.log_floor})")
        d = self.dvi
        if d.rl_start_step is not None and d.rl_start_step < 0:
            raise ConfigError(f"dvi.rl_start_step must be >= 0 or null (got {d.rl_start_step})")
        if min(d.kl_weight, d.ce_weight, d.pg_weight) < 0:
            raise ConfigError("dvi.kl_weight, dvi.ce_weight and dvi.pg_weight must be >= 0")
        self._validate_data()
        return self

    def _validate_data(self) -> None:
        """Answer modes and length limits: a combination that cannot mean what it says is an error."""
        d = self.data
        if d.max_prompt_tokens < 1 or (d.max_answer_tokens is not None and d.max_answer_tokens < 1):
            raise ConfigError("data.max_prompt_tokens and data.max_answer_tokens must be >= 1")
        if (
            d.answers == "as_is"
            and self.mode == "opd"
            and (self.rollout.path == "engine" or self.rollout.temperature > 0)
        ):
            raise ConfigError(
                "data.answers=as_is teacher-forces the dataset's answers, but OPD rollouts with rollout.path=engine or "
                "rollout.temperature > 0 decode new text with the target: use data.answers=regenerate (or T = 0, path auto)"
            )

    @property
    def eval_block_size(self) -> int:
        return self.eval.block_size or self.rollout.block_size


# ---------------------------------------------------------------------------------------------------------------
# loading


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML or command-line value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': cannot use {value!r}")
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ConfigError(f"config key '{key}' must be one of {list(args)} (got {value!r})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key '{key}' must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer (got {value!r})")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be an integer (got {value!r})") from None
        if f != int(f):
            raise ConfigError(f"config key '{key}' must be an integer (got {value!r})")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number (got {value!r})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number (got {value!r})") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string (got {value!r})")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list (got {value!r})")
        (inner,) = args or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping (got {value!r})")
        return dict(value)
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise ConfigError(f"unknown config key '{prefix}{k}'{_suggest(str(k), list(fields))}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    cls: type = Config
    node = tree
    for i, p in enumerate(parts):
        fields = _fields(cls)
        if p not in fields:
            where = ".".join(parts[:i])
            raise ConfigError(
                f"unknown config key '{dotted}'{_suggest(p, list(fields))}"
                + (f" (section '{where}' has: {', '.join(fields)})" if where else "")
            )
        tp = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(
                    f"'{dotted}' is a section; set one of its keys, e.g. {dotted}.{next(iter(_fields(tp)))}=..."
                )
            node[p] = raw if tp is str or typing.get_origin(tp) is Literal else yaml.safe_load(raw) if raw else raw
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is not a section, so '{dotted}' does not exist")
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config section '{'.'.join(parts[: i + 1])}' must be a mapping")
        cls = tp


def read_tree(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw tree of a YAML file (optional) with `section.key=value` overrides applied; unknown keys are errors.
    `dopd.common.load.load_config` builds and resolves it."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like section.key=value")
        key, raw = ov.split("=", 1)
        _set_path(tree, key.strip(), raw.strip())
    return tree


def build_config(tree: dict[str, Any]) -> Config:
    """The typed, unresolved Config of a tree (every key checked and coerced); `dopd.common.load.resolve` resolves it."""
    return _build(Config, tree, "")


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
