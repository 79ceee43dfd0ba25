"""Named training recipes: `loss.recipe=<name>` fills every setting of a published recipe into the config at load.

Why: "the official recipe" is a claim about dozens of settings spread over loss, drafter and rollout keys; naming it
once, next to the file and commit it reproduces, makes a run's claim checkable. A recipe's `settings` fill every key
the config leaves unset (YAML or command line), so a key set anyway is a deliberate deviation: `deviations` lists
them and the training loop logs them; config.yaml records the resolved values. `required` keys define the recipe
(e.g. the DFlash recipes' frozen full-vocabulary head): another value is an error naming the key, not a deviation.
What a recipe cannot set (model scale, block size, schedule, data) stays a config key; each recipe's `differences`
lists them with the official value and the key (docs/recipes.md).

Sources: bingyang-lei/Draft-OPD, each fact a row of docs/recipes.md (R1-R16; SpecForge's R17-R20) with its file and commit (69b03da =
69b03dab8697, e81a8bc = e81a8bc488ef, a737810 = a73781096436; upstream verl at 68227b907, the fork's base).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:
    from .config import Config

RECIPES: Registry[type[Recipe]] = Registry("recipes", "loss.recipe")

# keys whose None means "not set, resolve it" (filled by the objective and the drafter kind): a recipe fills them
# even where a YAML file spells them out as null
_NONE_IS_UNSET = frozenset({"loss.objective", "loss.response", "loss.acc_divergence", "loss.lambda_rej"})


@dataclass(frozen=True)
class Difference:
    """What still differs from the official code under this recipe, and the one key that controls it."""

    what: str
    official: str
    key: str


register_recipe = RECIPES.register
recipe_named = RECIPES.named


def _get(cfg: Config, key: str) -> Any:
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


def _set(cfg: Config, key: str, value: Any) -> None:
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, value)


class Recipe:
    name: ClassVar[str]
    source: ClassVar[str]  # the official file(s) and commit it reproduces ("dopd" for dopd's own)
    what: ClassVar[str]  # one line
    settings: ClassVar[dict[str, Any]]  # dotted config key -> the recipe's value (filled where unset)
    required: ClassVar[tuple[str, ...]] = ()  # keys of `settings` whose value defines the recipe
    differences: ClassVar[tuple[Difference, ...]] = ()

    @classmethod
    def fill_tree(cls, tree: dict[str, Any]) -> None:
        """Fill the recipe's settings into a raw config tree (YAML + overrides) wherever the tree lacks the key."""
        for key, value in cls.settings.items():
            section, field = key.split(".")
            node = tree.setdefault(section, {})
            if not isinstance(node, dict):
                continue  # a malformed section: the config builder names it
            if field not in node or (node[field] is None and key in _NONE_IS_UNSET):
                node[field] = value

    @classmethod
    def fill_config(cls, cfg: Config) -> None:
        """A Config built in code (no tree to read): a field still at its dataclass default takes the recipe's value."""
        for key, value in cls.settings.items():
            section, field = key.split(".")
            default = {f.name: f for f in dataclasses.fields(getattr(cfg, section))}[field]
            start = default.default if default.default is not dataclasses.MISSING else default.default_factory()  # type: ignore[misc]
            if _get(cfg, key) == start:
                _set(cfg, key, value)

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse a config that changes what defines the recipe (ConfigError naming the key)."""
        for key in cls.required:
            want, got = cls.settings[key], _get(cfg, key)
            if got != want:
                shown = (
                    "null (the full vocabulary)" if want is None and key == "drafter.draft_vocab_size" else repr(want)
                )
                raise ConfigError(
                    f"config key '{key}'={got!r} contradicts loss.recipe={cls.name}, which is defined by {key}={shown} "
                    f"({cls.what}); drop the key or choose another recipe"
                )

    @classmethod
    def deviations(cls, cfg: Config) -> list[tuple[str, Any, Any]]:
        """(key, this config's value, the recipe's value) for every recipe setting the config changes."""
        return [(k, _get(cfg, k), v) for k, v in cls.settings.items() if _get(cfg, k) != v]


# OPD runs as its own verl job from a saved drafter (a model directory: no optimizer state); dopd's one run keeps
# the SFT warm-up's AdamW moments unless a run that starts from the warm-up's checkpoint sets it fresh
_FRESH_OPTIMIZER = Difference(
    "AdamW moments at the Draft-OPD start: the SFT warm-up's",
    "fresh (a new job from a saved drafter)",
    "learner.opd_optimizer",
)
_DFLASH_DIFFERENCES = (
    Difference(
        "starting drafter",
        "a converged DFlash drafter (z-lab/Qwen3-4B-DFlash-b16; dopd: its own SFT warm-up)",
        "drafter.init",
    ),
    Difference("block size", "16 = 1 anchor + 15 drafts", "rollout.block_size"),
    Difference("drafter depth", "several layers (not confirmed: configs not readable)", "drafter.num_layers"),
    Difference("learning rate", "3e-4", "learner.lr"),
    Difference("warm-up", "5% of the steps", "learner.warmup_steps"),
    Difference("the cosine's floor (dopd: 0.1 x lr)", "not set in the scripts (not confirmed)", "learner.min_lr_ratio"),
    Difference("optimizer batch", "21 prompts x 10 accumulation steps", "learner.micro_batch_size"),
    Difference("response length", "4096 tokens", "rollout.max_new_tokens"),
    Difference(
        "MASK input: the embedding row of this token, frozen",
        "the drafter checkpoint's mask token",
        "drafter.mask_token_id",
    ),
    Difference("policy lag", "one rollout batch per optimizer pass", "learner.refresh_every"),
    _FRESH_OPTIMIZER,
)


@register_recipe
class Official2605(Recipe):
    """The official Draft-OPD recipe for DFlash as published [docs/recipes.md R1-R8]: `run_qwen_gsm8k_forward-ins.sh` over
    `run_qwen_gsm8k.sh` at commit 69b03da, loss in `verl/verl/trainer/distillation/losses.py` (`distillation_loss`,
    `_local_bernoulli_forward_kl`) and verl's `kl_penalty` (`verl/trainer/ppo/core_algos.py` @68227b907).

    - accepted stream: the rollout's own verification blocks (every verification boundary is an anchor), positions
      up to and including each block's first rejection, labelled by the target's token: Bernoulli forward KL
      p log(p/q) + (1-p) log((1-p)/(1-q)) on that token, both log-probs floored at -10 (`log_prob_min_clamp`: a
      drafter log q below -10 gets no gradient: a dead zone, not a bound);
    - rejected stream: every drafted token from the first rejection on, k3 exactly as verl computes it (delta =
      clip(log p - log q, -20, 20), k3 = clip(e^delta - delta - 1, -10, 10), no floor on its inputs), weighted
      gamma^(offset-1) with gamma 0.8 and the offset counted from the block start (the first rejected token weighs
      gamma^accepted);
    - each stream's per-token loss clamped at 10 (`loss_max_clamp`); weights 1 / 1; the joint token mean
      (sum_acc + sum_rej) / (N_resp + sum of the rejected weights), N_resp = EVERY response token of the batch
      (verl's loss_mask = response_mask), not only the supervised ones;
    - DFlash drafter reading the target's embedding and LM head, both frozen, over the full vocabulary
      (`ComposedDFlashStudentForCausalLM.freeze_main_model`): a reduced draft vocabulary or a trainable head is
      refused, since a head shared by every block position is how the rejected stream leaks into accepted positions.
    """

    name = "official-2605"
    source = "bingyang-lei/Draft-OPD@69b03da run_qwen_gsm8k_forward-ins.sh + verl/verl/trainer/distillation/losses.py; verl@68227b907 core_algos.kl_penalty"
    what = "DFlash Draft-OPD: Bernoulli FKL (floor -10) + verl k3, gamma 0.8, clamp 10, frozen full-vocabulary head"
    settings = {
        "drafter.kind": "dflash", "drafter.draft_vocab_size": None, "drafter.train_lm_head": False, "drafter.train_mask": False,
        "loss.objective": "opd", "loss.response": "blocks", "loss.acc_divergence": "bernoulli", "loss.log_floor": -10.0,
        "loss.rej_divergence": "k3", "loss.k3": "verl", "loss.clamp": 10.0, "loss.gamma": 0.8, "loss.gamma_offset": "block",
        "loss.acc_at_first_rejection": True, "loss.lambda_acc": 1.0, "loss.lambda_rej": 1.0, "loss.rej_first_only": False,
        "loss.acc_denominator": "response_tokens", "loss.train_past_end": False, "loss.targets": "topk",
        "replay.anchors": "rollout", "replay.extra": "none", "rollout.temperature": 0.0,
    }  # fmt: skip
    required = ("drafter.kind", "drafter.draft_vocab_size", "drafter.train_lm_head", "loss.objective")
    differences = _DFLASH_DIFFERENCES


@register_recipe
class OfficialTV(Recipe):
    """The authors' newer DFlash recipe [docs/recipes.md R12, R13]: `run_qwen_gsm8k_forward-8b-local.sh` at commit e81a8bc (use_tv_loss=True,
    rejected_draft_first_token_only=True, accept decay off) over the TV loss of commit a737810
    (`verl/verl/trainer/distillation/losses.py` `_exact_tv_distillation_loss`, `verl/verl/models/transformers/
    dflash_student.py` `_forward_opd_tv`, `full_vocab_tv_distance`).

    One objective replaces both streams: per verification block the positions at offsets 1..r (the accepted drafts
    and the first rejection r; a block without a rejection 1..its segment, never the bonus token), d_k = exact total
    variation 1/2 sum_v |q_k(v) - p_k(v)| over the FULL vocabulary at T = 1 in fp32, the target conditioned on its
    own trajectory with its logits and head detached; block loss 1 - (1/n) sum_k prod_{j<=k} clip(1 - d_j, 0, 1)
    (one minus the block's expected acceptance over its positions); the mean over every block of the global batch
    (an all-reduced block count); no decay, no clamp. It never labels a position whose prefix was a wrong draft.
    The records carry the target's final hidden state (`loss.targets=full`) for the exact target distributions.
    """

    name = "official-tv"
    source = "bingyang-lei/Draft-OPD@e81a8bc run_qwen_gsm8k_forward-8b-local.sh over @a737810 losses.py _exact_tv_distillation_loss + dflash_student.py _forward_opd_tv"
    what = "DFlash end-to-end exact TV over the full vocabulary, positions up to the first rejection, mean over blocks"
    settings = {
        "drafter.kind": "dflash", "drafter.draft_vocab_size": None, "drafter.train_lm_head": False, "drafter.train_mask": False,
        "loss.objective": "e2e_tv", "loss.response": "blocks", "loss.lambda_rej": 0.0, "loss.rej_first_only": True,
        "loss.train_past_end": False, "loss.targets": "full", "replay.anchors": "rollout", "replay.extra": "none",
        "rollout.temperature": 0.0,
    }  # fmt: skip
    required = (
        "drafter.kind",
        "drafter.draft_vocab_size",
        "drafter.train_lm_head",
        "loss.objective",
        "loss.targets",
        "replay.anchors",
    )
    differences = tuple(
        d if d.what != "learning rate" else Difference("learning rate", "3e-4 (10 epochs)", "learner.lr")
        for d in _DFLASH_DIFFERENCES
    )


@register_recipe
class OfficialEagle3(Recipe):
    """The official Draft-OPD recipe for EAGLE-3 [docs/recipes.md R10]: `run_qwen_eagle3.sh` and `verl/verl/models/transformers/
    eagle3_student.py` (`_run_eagle3_full_ttt_forward`) at commit a737810, aggregated by `distillation_loss` in
    `verl/verl/trainer/distillation/losses.py` (`compute_eagle3_native_target_distribution_loss`).

    Full training-time test over every response position of the fresh rollout text: 7 steps, step i weighted 0.8^i,
    soft cross-entropy to softmax(target logits restricted to the draft vocabulary) at T = 1 (exact: the records
    carry the target's final hidden state, `loss.targets=full`); a step whose full-vocabulary target argmax is
    outside the draft vocabulary is masked; per-position sums divided by EVERY response token of the batch (not by
    the sum of 0.8^i); rejected stream off (weight 0.0: the authors left its alignment for later). Trainable: the
    draft layer, fc, norm and the drafter's own head over its draft vocabulary; the embedding is the target's, frozen.
    """

    name = "official-eagle3"
    source = "bingyang-lei/Draft-OPD@a737810 run_qwen_eagle3.sh + verl/verl/models/transformers/eagle3_student.py + losses.py"
    what = "EAGLE-3 Draft-OPD: full TTT (7 steps, 0.8^i) soft CE to the target over the draft vocabulary, own head"
    settings = {
        "drafter.kind": "eagle3", "drafter.num_layers": 1, "drafter.train_lm_head": True, "loss.objective": "opd",
        "loss.response": "ttt", "loss.ttt_depth": 7, "loss.ttt_step_weight": 0.8, "loss.sft_objective": "kl",
        "loss.targets": "full", "loss.lambda_rej": 0.0, "loss.acc_denominator": "response_tokens",
        "replay.anchors": "rollout", "replay.extra": "none", "rollout.temperature": 0.0,
    }  # fmt: skip
    required = ("drafter.kind", "loss.objective", "loss.response")
    differences = (
        Difference("starting drafter", "a trained EAGLE-3 drafter", "drafter.init"),
        Difference("draft vocabulary", "SpecForge's (32,000 ids for Qwen3)", "drafter.draft_vocab_size"),  # R20
        Difference("chain length", "7 drafts (num_draft_tokens 8)", "rollout.block_size"),
        Difference("learning rate", "1e-4", "learner.lr"),
        Difference("warm-up", "1.5% of the steps", "learner.warmup_steps"),
        Difference(
            "the cosine's floor (dopd: 0.1 x lr)", "not set in the scripts (not confirmed)", "learner.min_lr_ratio"
        ),
        Difference("optimizer batch", "24 prompts x 10 accumulation steps", "learner.micro_batch_size"),
        Difference("response length", "3583 tokens", "rollout.max_new_tokens"),
        _FRESH_OPTIMIZER,
    )

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        if cfg.drafter.draft_vocab_size is None and not cfg.drafter.train_lm_head:
            raise ConfigError(
                "config key 'drafter.train_lm_head'=False contradicts loss.recipe=official-eagle3, which trains the "
                "drafter's own head: set drafter.draft_vocab_size (SpecForge: 32000) or drafter.train_lm_head=true"
            )


@register_recipe
class Dopd2511(Recipe):
    """dopd's own DFlash variant before it was checked line by line against the official code (the default of
    learner/losses.py until this recipe was named; docs/plateau/v2 arm B ran it with drafter.draft_vocab_size=8192,
    i.e. with a reduced vocabulary whose own head AdamW trains). It differs from official-2605 in:
    - k3 on both log-probs floored at -10 first (`loss.k3=floored`): r >= -10, k3 <= 9, the clamp never binds and
      every rejected token is pushed down with a gradient of about 1;
    - the Bernoulli stream's probabilities clamped at 1e-8, i.e. log-probs floored at -18.4, not -10 (`loss.log_floor`);
    - the denominator counts the accepted stream's supervised positions, not every response token
      (`loss.acc_denominator=supervised`);
    - block positions past the answer's end (its greedy lookahead) are trained (`loss.train_past_end`);
    - a learned MASK vector (`drafter.train_mask`); a reduced draft vocabulary and a trainable head are allowed.
    """

    name = "dopd-2511"
    source = "dopd (learner/losses.py before the official recipes were named; docs/plateau/v2 arm B)"
    what = "dopd's DFlash variant: floored k3, Bernoulli floor log(1e-8), supervised-token denominator, learned MASK"
    settings = {
        "drafter.kind": "dflash", "drafter.train_mask": True, "loss.objective": "opd", "loss.response": "blocks",
        "loss.acc_divergence": "bernoulli", "loss.log_floor": math.log(1e-8), "loss.rej_divergence": "k3", "loss.k3": "floored",
        "loss.clamp": 10.0, "loss.gamma": 0.8, "loss.gamma_offset": "block", "loss.acc_at_first_rejection": True,
        "loss.lambda_acc": 1.0, "loss.lambda_rej": 1.0, "loss.rej_first_only": False, "loss.acc_denominator": "supervised",
        "loss.train_past_end": True, "loss.targets": "topk", "replay.anchors": "rollout", "replay.extra": "none",
    }  # fmt: skip
    required = ("drafter.kind", "loss.objective")
    differences = (
        (
            Difference("k3 on log-probs floored at -10", "verl's k3, unfloored", "loss.k3"),
            Difference("Bernoulli log-probs floored at log(1e-8)", "-10", "loss.log_floor"),
            Difference("denominator: the supervised positions", "every response token", "loss.acc_denominator"),
            Difference(
                "positions past the answer's end trained", "segments end at the response's end", "loss.train_past_end"
            ),
            Difference("a learned MASK vector", "a frozen embedding row", "drafter.train_mask"),
            Difference(
                "a reduced vocabulary with its own trained head allowed (v2: 8,192 ids)",
                "the frozen full-vocabulary head",
                "drafter.draft_vocab_size",
            ),
        )
        + _DFLASH_DIFFERENCES[:-2]
        + _DFLASH_DIFFERENCES[-1:]
    )


def apply_recipe_tree(tree: dict[str, Any]) -> None:
    """The recipe a raw config tree names, filled into it (load_config, config_from_dict)."""
    loss = tree.get("loss")
    if isinstance(loss, dict) and loss.get("recipe") is not None:
        recipe_named(str(loss["recipe"])).fill_tree(tree)


def recipe_table() -> str:
    """docs/recipes.md's recipe table (recipe, what it reproduces, each remaining difference with the official value and
    the key that controls it), generated from the recipes (tests/test_recipes.py keeps docs/recipes.md current)."""
    lines = ["| recipe | reproduces | what still differs here | official | key |", "|---|---|---|---|---|"]
    for r in RECIPES.values():
        for i, d in enumerate(r.differences):
            head = f"`{r.name}` | {r.source}" if i == 0 else " | "
            lines.append(f"| {head} | {d.what} | {d.official} | {('`' + d.key + '`') if d.key else ''} |")
    return "\n".join(lines)
