"""What every drafter is: its saved spec, the frozen pieces it shares with the target, and the two forwards.

A drafter exposes
- `propose(state, ...)`: the inference forward the speculative engine calls once per verification step;
- `block_hidden(...)`: the training forward over many blocks of a sequence at once;
- `draft_blocks(...)`: drafting K tokens from many anchors at once (error-position replay).
All three run the same computation (tests check inference and training agree), so the learner trains exactly the
function that drafts. The token embedding and, by default, the LM head are the target's own frozen matrices,
held as non-persistent buffers: they are never saved, published to actors or handed to the optimizer.
"""

from __future__ import annotations

import copy
import json
from abc import abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelError
from ..models import TargetInfo
from ..registry import Registry
from ..sampling import processed_probs, sample

if TYPE_CHECKING:
    from ..config import Config, DrafterConfig
    from ..record import TeacherRecord

SPEC_VERSION = 1


@dataclass
class DrafterSpec:
    """Everything needed to rebuild a drafter's modules (saved as config.json)."""

    kind: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    feature_layers: list[int]  # indices into the target's HF hidden_states tuple (0 = embeddings)
    target_hidden_size: int
    vocab_size: int
    draft_vocab_size: int | None = None
    train_lm_head: bool = False
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    mask_token_id: int | None = None
    target: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None  # DVI: rank r of the low-rank head term gamma * A B
    lora_gamma: float = 1.0  # DVI: gamma

    @property
    def own_head(self) -> bool:
        return self.draft_vocab_size is not None or self.train_lm_head


KINDS: Registry[type[Drafter]] = Registry("drafter kinds", "drafter.kind", attr="kind", error=ModelError)
# class decorator: a drafter kind registers itself under `cls.kind` (the value of `drafter.kind`)
register_kind = KINDS.register


def kind_class(kind: str) -> type[Drafter]:
    """The registered class of a drafter kind, or an error that lists the known kinds."""
    if kind not in KINDS:
        raise ModelError(f"unknown drafter kind '{kind}' (known: {', '.join(KINDS)})")
    return KINDS[kind]


def read_drafter_config(path: str | Path) -> dict:
    """The config.json of a drafter directory (any format), or a ModelError naming what is wrong with it."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelError(f"no drafter at {path}: config.json is missing")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"drafter config {cfg} is not valid JSON: {e}") from None


def write_drafter(path: str | Path, spec: DrafterSpec | dict, state: dict) -> None:
    """A drafter directory (config.json + model.safetensors) from its spec and state dict: what `save_pretrained`
    writes, also from weights gathered off a learner (no drafter module needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"dopd_spec_version": SPEC_VERSION, **(spec if isinstance(spec, dict) else asdict(spec))}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    tensors = {
        k: (v.detach().cpu() if torch.is_tensor(v) else torch.from_numpy(np.array(v))).contiguous()
        for k, v in state.items()
    }
    save_file(tensors, str(path / "model.safetensors"))


@dataclass
class DraftState:
    """Per-slot inference cache of a drafter: context K/V per layer and how much context each slot holds."""

    k: list[torch.Tensor]  # [B, Hkv, S, d] per layer
    v: list[torch.Tensor]
    ctx_end: torch.Tensor  # [B] context entries occupy slots < ctx_end

    def reset(self, rows: torch.Tensor, start: int) -> None:
        self.ctx_end[rows] = start


@dataclass
class Proposal:
    """K drafted tokens per row (target ids) with what verification and records need."""

    tokens: torch.Tensor  # [b, K]
    q: torch.Tensor | None  # [b, K, V] processed draft distributions over the target vocabulary (None if greedy)
    q_token: torch.Tensor  # [b, K] processed probability of each drafted token (1.0 when greedy)
    logprob: torch.Tensor  # [b, K] raw (T=1) log-probability of each drafted token


class Drafter(nn.Module):
    """A drafter kind is one subclass in one file, registered with `@register_kind`. Besides its forwards it
    declares its defaults: the feature layers it reads, its SFT plan, the loss settings of its official recipe (its
    docstring cites the docs/recipes.md rows) and the server formats it exports to; nothing else in dopd branches on
    the kind's name."""

    kind: str = "base"
    # the loss settings of this kind's official recipe, filled into `loss.*` keys the config leaves unset (at load)
    default_loss: ClassVar[dict[str, Any]] = {"objective": "opd"}
    export_formats: ClassVar[tuple[str, ...]] = ()  # `dopd export --format` values this kind can be written in
    import_formats: ClassVar[tuple[str, ...]] = ()  # foreign formats this kind reads (`detect_format` names them)

    # --- what a kind declares ---------------------------------------------------------------------------------
    @classmethod
    def default_feature_layers(cls, num_target_layers: int, num_draft_layers: int) -> list[int]:
        """Indices into HF `hidden_states` (index i = output of layer i-1) the drafter reads by default."""
        raise NotImplementedError(f"drafter kind '{cls.kind}' declares no default feature layers")

    @classmethod
    def check_config(cls, cfg: DrafterConfig, feature_layers: list[int], num_target_layers: int) -> None:
        """Refuse settings this kind cannot build (ModelError naming the key)."""

    @classmethod
    def check_recipe(cls, cfg: Config) -> None:
        """Refuse training settings this kind cannot train exactly (ConfigError naming the key), after resolution."""

    @classmethod
    def spec_extra(cls, cfg: DrafterConfig) -> dict[str, Any]:
        """Kind-specific `DrafterSpec` fields taken from the config."""
        return {}

    # the SFT plan: teacher-forced blocks of `sft_depth` positions at `sft_anchors`, position j weighted
    # `sft_step_weights[j]` (learner/batch.py `sft_batch`)
    @classmethod
    def sft_depth(cls, cfg: Config) -> int:
        return cfg.rollout.block_size

    @classmethod
    def sft_step_weights(cls, cfg: Config) -> torch.Tensor:
        return torch.ones(cls.sft_depth(cfg))

    @classmethod
    def sft_anchors(cls, rec: TeacherRecord, cfg: Config, rng: np.random.Generator) -> np.ndarray:
        """Answer positions (prefix lengths) to start teacher-forced blocks at: every one by default."""
        return np.arange(max(rec.prompt_len, 1), rec.token_ids.shape[0], dtype=np.int64)

    def configure_training(self, cfg: DrafterConfig) -> None:
        """Freeze what this kind's config says stays fixed while training (the learner calls it once)."""

    # --- what a kind declares: its formats (formats.py holds the pieces every format shares) -----------------
    def check_export(self, fmt: str) -> None:
        """Refuse, naming it, what format `fmt` cannot represent of this drafter (before anything is written)."""

    def export(self, fmt: str, out: Path, verifier: str, verifier_archs: list[str], speculative_tokens: int) -> None:
        """Write this drafter to directory `out` in `fmt` (one of `export_formats`); `verifier` / `verifier_archs`
        are the target as the server should name it."""
        raise ModelError(f"drafter kind '{self.kind}' has no {fmt} export")

    @classmethod
    def detect_format(cls, meta: dict) -> str | None:
        """The foreign format (one of `import_formats`) a drafter config.json is in, when this kind reads it."""
        return None

    @classmethod
    def import_format(
        cls, fmt: str, path: Path, meta: dict, state: dict, info: TargetInfo, embed_weight, head_weight
    ) -> Drafter:
        """A drafter of this kind from foreign format `fmt` (config `meta`, safetensors `state`), checked against
        the target."""
        raise ModelError(f"drafter kind '{cls.kind}' imports no {fmt} drafter")

    @classmethod
    def trainable_positions(
        cls, tokens: torch.Tensor, lengths: torch.Tensor, anchors: torch.Tensor, block_tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """[B,M,K] where this kind's training forward equals its inference forward on rollout blocks (None: all)."""
        return None

    def __init__(self, spec: DrafterSpec, embed_weight: torch.Tensor, head_weight: torch.Tensor, draft_ids=None):
        super().__init__()
        self.spec = spec
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        V = spec.vocab_size
        if spec.draft_vocab_size is not None:
            if draft_ids is None:
                draft_ids = torch.arange(spec.draft_vocab_size)
            draft_ids = torch.as_tensor(draft_ids, dtype=torch.long)
            if draft_ids.numel() != spec.draft_vocab_size:
                raise ModelError(f"draft vocabulary map has {draft_ids.numel()} ids, spec says {spec.draft_vocab_size}")
        else:
            draft_ids = torch.arange(V)
        self.register_buffer("draft_ids", draft_ids)  # draft index -> target id (saved: the d2t map)
        self.register_buffer("t2d", self._t2d(draft_ids, V), persistent=False)  # target id -> draft index or -1
        # the target's head stays referenced (not copied, not saved) even when the drafter has its own head
        self.register_buffer("head_weight", head_weight.detach(), persistent=False)
        self.lm_head = None
        if spec.own_head:
            self.lm_head = nn.Linear(spec.hidden_size, draft_ids.numel(), bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(head_weight.detach()[draft_ids].to(self.lm_head.weight.dtype))

    @staticmethod
    def _t2d(draft_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        t2d = torch.full((vocab,), -1, dtype=torch.long, device=draft_ids.device)
        t2d[draft_ids] = torch.arange(draft_ids.numel(), device=draft_ids.device)
        return t2d

    # --- identity -------------------------------------------------------------------------------------------
    @property
    def needs_target_features(self) -> bool:
        return True

    @property
    def feature_layers(self) -> list[int]:
        return list(self.spec.feature_layers)

    @property
    def target_info(self) -> TargetInfo:
        return TargetInfo.from_dict(self.spec.target)

    @property
    def draft_vocab(self) -> int:
        return int(self.draft_ids.numel())

    def bind_target(self, model: nn.Module) -> None:
        """Called by the engine with the target model it verifies with. A self-speculative drafter (DVI) drafts with
        the target's own layers and keeps a reference to them here; other drafters need nothing."""

    def for_inference(self, dtype: torch.dtype) -> Drafter:
        """This drafter with its weights in `dtype` (drafting runs in the target's dtype: bf16 where the hardware has
        it), or itself when they already are. The frozen target matrices and a bound target are shared, not copied."""
        if self._dtype() == dtype:
            return self
        shared = (self.embed_weight, self.head_weight, self.__dict__.get("_target"))
        twin = copy.deepcopy(self, memo={id(t): t for t in shared if t is not None})
        return twin.to(dtype).eval()

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- shared io ------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_weight
        return F.embedding(ids, w).to(self._dtype())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from normed hidden states."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.head_weight.to(h.dtype))

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _chain(self, h: torch.Tensor, K: int, advance, logits_of, temperature: float, top_p: float, gen) -> Proposal:
        """Chain drafting, shared by the kinds that draft one token per forward (EAGLE-3, DVI): sample d_1 from
        `logits_of(h)` (h: the state at the last committed token), then K - 1 times h = `advance(d_{j-1}, h, j)` and
        sample d_j. What differs per kind is only how a drafted token moves the state forward."""
        toks, qs, qtok, lps = [], [], [], []
        for j in range(1, K + 1):
            if j > 1:
                h = advance(toks[-1], h, j)
            ids, qf, qt, lp, _ = self._sample(logits_of(h), temperature, top_p, gen)
            toks.append(ids)
            qs.append(qf)
            qtok.append(qt)
            lps.append(lp)
        q = torch.stack(qs, 1) if temperature > 0 else None
        return Proposal(torch.stack(toks, 1), q, torch.stack(qtok, 1), torch.stack(lps, 1))

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float, gen) -> tuple[torch.Tensor, ...]:
        """Draw from draft-vocab logits [b, Vd]: (target ids, q over the target vocab or None when greedy,
        processed q(token), raw log q(token), draft indices)."""
        logits = logits.float()
        lse = torch.logsumexp(logits, -1)
        if temperature <= 0:
            idx = logits.argmax(-1)
            q_tok = torch.ones_like(lse)
            q_full = None
        else:
            qd = processed_probs(logits, temperature, top_p)
            idx = sample(qd, gen)
            q_tok = qd.gather(-1, idx[:, None]).squeeze(-1)
            q_full = torch.zeros(qd.shape[0], self.spec.vocab_size, device=qd.device).index_copy_(1, self.draft_ids, qd)
        logp = logits.gather(-1, idx[:, None]).squeeze(-1) - lse
        return self.draft_ids[idx], q_full, q_tok, logp, idx

    # --- the three forwards -----------------------------------------------------------------------------------
    @abstractmethod
    def new_state(self, batch: int, max_len: int, device, dtype) -> DraftState: ...

    @abstractmethod
    def context_start(self) -> int:
        """The first slot a fresh sequence's context occupies (reset value of `DraftState.ctx_end`)."""

    @abstractmethod
    def propose(
        self,
        state: DraftState,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        features: torch.Tensor,
        lengths: torch.Tensor,
        K: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Draft K tokens for slots `rows`, whose committed prefixes are tokens[rows, :lengths] with target
        features known for positions < lengths - 1. Extends the cached context with what is new since last call."""

    @abstractmethod
    def block_hidden(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        lengths: torch.Tensor,
        anchors: torch.Tensor,
        block_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Training forward. tokens [B,S], features [B,S,F], lengths [B]; anchors [B,M] prefix lengths (blocks
        predict positions anchor..anchor+K-1; padding blocks have anchor 0); block_tokens [B,M,K] the block's
        draft tokens (inputs of later steps where the drafter is autoregressive). Returns normed hidden states
        [B,M,K,H] whose `logits` are the drafter's distributions at the K block positions, exactly as drafted."""

    @abstractmethod
    def draft_blocks(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        lengths: torch.Tensor,
        anchors: torch.Tensor,
        K: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft K tokens from every anchor at once: (target ids, raw log-probs, processed q(d)), each [B,M,K]."""

    def _sample_blocks(
        self, h: torch.Tensor, temperature: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`draft_blocks` for a kind whose K block positions come from one forward: sample every position of the
        hidden states h [B,M,K,H] at once and return (target ids, raw log-probs, processed q(d)), each [B,M,K]."""
        B, M, K = h.shape[:3]
        ids, _, qt, lp, _ = self._sample(self.logits(h).reshape(B * M * K, -1), temperature, 1.0, generator)
        return ids.view(B, M, K), lp.view(B, M, K), qt.view(B, M, K)

    # --- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.spec, self.state_dict())

    @staticmethod
    def read_spec(path: str | Path) -> DrafterSpec:
        cfg = Path(path) / "config.json"
        meta = read_drafter_config(path)
        if meta.pop("dopd_spec_version", None) != SPEC_VERSION:
            raise ModelError(f"{cfg} is not a dopd drafter (spec version {SPEC_VERSION} expected)")
        try:
            return DrafterSpec(**meta)
        except TypeError as e:
            raise ModelError(f"drafter config {cfg} does not fit this dopd version: {e}") from None

    def load_weights(self, path: str | Path) -> None:
        state = load_file(str(Path(path) / "model.safetensors"))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"drafter weights at {path} do not match its config (missing {missing[:4]}, unexpected {unexpected[:4]})"
            )

    @torch.no_grad()
    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Choose the reduced draft vocabulary of a fresh drafter (its own head re-initialised from the target's
        rows of those ids). Only before training: the head's rows change meaning."""
        draft_ids = torch.as_tensor(draft_ids, dtype=torch.long, device=self.draft_ids.device)
        if draft_ids.shape != self.draft_ids.shape:
            raise ModelError(f"draft vocabulary of {draft_ids.numel()} ids for a drafter of {self.draft_ids.numel()}")
        self.draft_ids.copy_(draft_ids)
        self.t2d = self._t2d(self.draft_ids, self.spec.vocab_size)
        if self.lm_head is not None:
            self.lm_head.weight.copy_(
                self.head_weight[draft_ids.to(self.head_weight.device)].to(self.lm_head.weight.dtype)
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.t2d = self._t2d(self.draft_ids, self.spec.vocab_size)
        return out
