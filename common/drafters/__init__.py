"""Drafter construction and loading. A drafter kind is one module here that registers itself (`register_kind`);
importing it below is what makes `drafter.kind=<name>` known."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DrafterConfig
from ..errors import ModelError
from ..models import TargetInfo

# the kinds: each module registers its class in KINDS (a new kind is a new module and one line here)
from . import eagle3, dflash, dvi, peagle  # noqa: F401  isort: skip  (registration order: the order kinds are listed in)
from .base import KINDS, Drafter, DrafterSpec, DraftState, Proposal, kind_class, write_drafter
from .formats import detect_format, export_drafter, export_formats, import_drafter

__all__ = [
    "KINDS",
    "Drafter",
    "DrafterSpec",
    "DraftState",
    "Proposal",
    "build_drafter",
    "load_drafter",
    "draft_vocab_from_counts",
    "draft_vocab_for",
    "kind_class",
    "spec_for",
    "token_counts",
    "write_drafter",
    "export_formats",
    "detect_format",
    "export_drafter",
    "import_drafter",
]


def _rope_theta(hf_config) -> float:
    rp = getattr(hf_config, "rope_parameters", None) or {}
    return float(rp.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def spec_for(cfg: DrafterConfig, info: TargetInfo, hf_config) -> DrafterSpec:
    """The drafter shapes for a target: width, heads and RoPE follow the target, depth follows the config."""
    kind = kind_class(cfg.kind)
    L = info.num_layers
    layers = cfg.feature_layers or kind.default_feature_layers(L, cfg.num_layers)
    bad = [i for i in layers if not 0 <= i <= L]
    if bad:
        raise ModelError(f"drafter.feature_layers {bad} out of range for a {L}-layer target (hidden_states 0..{L})")
    heads = hf_config.num_attention_heads
    kind.check_config(cfg, layers, L)
    if cfg.draft_vocab_size is not None and not 0 < cfg.draft_vocab_size <= info.vocab_size:
        raise ModelError(f"drafter.draft_vocab_size must be in 1..{info.vocab_size} (got {cfg.draft_vocab_size})")
    return DrafterSpec(
        kind=cfg.kind,
        hidden_size=info.hidden_size,
        intermediate_size=cfg.intermediate_size or hf_config.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or info.hidden_size // heads,
        feature_layers=list(layers),
        target_hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size,
        train_lm_head=cfg.train_lm_head,
        rope_theta=_rope_theta(hf_config),
        rms_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        mask_token_id=cfg.mask_token_id,
        target=info.to_dict(),
        **kind.spec_extra(cfg),
    )


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target ids (ties broken by id), sorted ascending: the draft->target map."""
    order = torch.argsort(-counts.double() * (counts.numel() + 1) + torch.arange(counts.numel()).double())
    return order[:size].sort().values


def draft_vocab_for(cfg: DrafterConfig, sequences, vocab_size: int) -> torch.Tensor | None:
    """The reduced draft vocabulary a fresh drafter trains with: the `draft_vocab_size` most frequent answer tokens
    of the SFT data's (token_ids, prompt_len) sequences; None when the drafter keeps the full vocabulary or comes
    with its own map (`drafter.init`). The one place a run chooses it (the learner, before its first step)."""
    if cfg.draft_vocab_size is None or cfg.init:
        return None
    return draft_vocab_from_counts(token_counts(sequences, vocab_size), cfg.draft_vocab_size)


def token_counts(sequences, vocab_size: int) -> torch.Tensor:
    """Answer-token frequencies of (token_ids, prompt_len) sequences: what a reduced draft vocabulary keeps."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, plen in sequences:
        counts += torch.bincount(torch.as_tensor(ids[plen:], dtype=torch.long), minlength=vocab_size)
    return counts


def build_drafter(
    cfg: DrafterConfig,
    info: TargetInfo,
    hf_config,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    token_counts: torch.Tensor | None = None,
    seed: int = 0,
    placeholder_vocab: bool = False,
) -> Drafter:
    """A fresh drafter (or `cfg.init` loaded) for the target described by `info` / `hf_config`.

    A reduced draft vocabulary is the `draft_vocab_size` most frequent ids of `token_counts`; with
    `placeholder_vocab` (a copy that will receive its weights, draft map included, before it drafts) ids 0..Vd-1.
    """
    if cfg.init:
        return load_drafter(cfg.init, info, embed_weight, head_weight)
    spec = spec_for(cfg, info, hf_config)
    draft_ids = None
    if spec.draft_vocab_size is not None:
        if token_counts is not None:
            draft_ids = draft_vocab_from_counts(token_counts, spec.draft_vocab_size)
        elif not placeholder_vocab:
            raise ModelError("a reduced draft vocabulary needs token frequencies (train data) to pick its tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KINDS[spec.kind](spec, embed_weight, head_weight, draft_ids)
    return model.to(torch.float32)


def load_drafter(path: str | Path, info: TargetInfo, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> Drafter:
    """Load a saved drafter, refusing one saved for a target of other shapes. A speculators / SGLang (SpecForge)
    EAGLE-3 or a vLLM (z-lab) DFlash directory is converted on load (formats.py), checked against the target."""
    fmt = detect_format(path)
    if fmt != "dopd":
        return import_drafter(path, info, embed_weight, head_weight, fmt)
    spec = Drafter.read_spec(path)
    saved = TargetInfo.from_dict(spec.target)
    info.check_compatible(saved, f"drafter {path}")
    if spec.kind not in KINDS:
        raise ModelError(f"drafter {path} has unknown kind '{spec.kind}' (known: {', '.join(KINDS)})")
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        draft_ids = f.get_tensor("draft_ids") if spec.draft_vocab_size is not None else None
    model = KINDS[spec.kind](spec, embed_weight, head_weight, draft_ids)
    model.load_weights(path)
    return model.to(torch.float32)


def drafter_for_target(name: str, target, cfg: DrafterConfig | None = None, seed: int = 0) -> Drafter:
    """`init-<kind>` (fresh weights: init-eagle3, init-dflash, init-dvi) or the path of a saved drafter, paired with a
    loaded target."""
    inits = [f"init-{k}" for k in KINDS]
    if name.startswith("init-"):
        kind = name[len("init-") :]
        if kind not in KINDS:
            raise ModelError(f"unknown drafter '{name}' (use {', '.join(inits)}, or a saved drafter directory)")
        base = cfg or DrafterConfig()
        cfg = DrafterConfig(**{**base.__dict__, "kind": kind, "init": None})
        if cfg.draft_vocab_size is not None:
            raise ModelError("a fresh drafter with a reduced vocabulary needs training data; train one with dopd train")
        d = build_drafter(
            cfg, target.info, target.model.config, target.embed_tokens.weight, target.lm_head.weight, seed=seed
        )
    else:
        if not Path(name).is_dir():
            raise ModelError(
                f"drafter '{name}' is neither {' / '.join(inits)} nor a drafter directory (dopd, speculators, "
                "SGLang/SpecForge EAGLE-3, vLLM DFlash)"
            )
        d = load_drafter(name, target.info, target.embed_tokens.weight, target.lm_head.weight)
    d.bind_target(target.model)
    return d.to(target.device)
