"""Drafters that leave dopd: the generic half of export to the servers' formats and import of drafters trained
elsewhere. A kind owns its formats: it declares `export_formats`, writes them (`Drafter.export`), recognises a
foreign config.json (`Drafter.detect_format`) and reads it (`Drafter.import_format`), each in the kind's own file
next to its modules, so export and import of one format cannot drift apart; this module only asks the registered
kinds and holds the pieces every format shares (vocabulary maps, the Llama layer config, the verifier, the checks
against the target). The facts for EAGLE-3 and DFlash, per kind file, are summarised here. The facts below were read from the loaders
(speculators 0.9.0 `models/eagle3`, vLLM `llama_eagle3.py` / DFlash, SGLang `llama_eagle3.py`, SpecForge export).

dopd's EAGLE-3 (see eagle3.py) is the speculators/vLLM EAGLE-3 with every optional flag off, which is why no flag
is left to the reader's default:
- first layer: concat(input_layernorm(embed(x_p)), hidden_norm(h)) into q/k/v of width 2H; the residual is the
  UN-normed hidden h  -> `norm_before_residual: false` (vLLM's adapter defaults it to TRUE when missing);
- the fused features go straight into `fc` (no norm over them) -> `norm_before_fc: false`, `fc_norm: false`;
- the hidden fed to the next unroll step is the last layer's pre-norm output -> `norm_output: false`;
- `fc` input order = the feature layers in the order given (low, mid, high), as servers concatenate aux states;
- entry p pairs token x_p with the feature of position p-1 at RoPE position p (speculators: position_ids = 1 + i
  for input_ids = x_{i+1}, hidden = f_i), plain Llama RoPE (no scaling), head_dim written explicitly;
- further layers are plain Llama decoder layers.

Formats (keys are the safetensors names; H = hidden, L = target layers, V / Vd = target / draft vocabulary):
- `speculators` (vLLM, `Eagle3Speculator`): config with `speculators_model_type: eagle3`, `draft_vocab_size`,
  `target_hidden_size`, `eagle_aux_hidden_state_layer_ids` (= HF hidden_states indices, dopd's feature layers as
  they are), the four norm flags, `transformer_layer_config` (a full Llama config) and `speculators_config`
  {algorithm, proposal_methods, default_proposal_method, verifier {name_or_path, architectures}}. Keys `layers.N.*`,
  `fc.weight` [H, 3H], `norm.weight`, `lm_head.weight` [Vd, H] (the target head's rows when the drafter has no
  head of its own), `embed_tokens.weight` (both shipped: speculators fills a missing one from the verifier only
  sometimes), and with a reduced vocabulary `d2t` (int64 OFFSETS: target id = d2t[i] + i, ascending ids) and `t2d`
  (bool mask over V). Pitfall: d2t as ids instead of offsets, or t2d as indices, loads without error and drafts
  garbage.
- `sglang` (SGLang / SpecForge, `LlamaForCausalLMEagle3`): a flat Llama config plus `draft_vocab_size` and
  `eagle_config.eagle_aux_hidden_state_layer_ids` counted as SGLang does (one less than HF indices: SGLang adds 1);
  keys `midlayer.*` (ONE layer: SGLang's multi-layer support differs by version), `fc`, `norm`, `lm_head`,
  `embed_tokens`, `d2t`, `t2d` (always written, identity offsets for a full vocabulary). `rope_scaling: null`.
- DFlash, `speculators` / `vllm` (vLLM `DFlashDraftModel`, the z-lab layout): Qwen3-style config with
  `block_size` (= K + 1: the anchor token and K masks), `dflash_config` {mask_token_id (the spec's, else 0: a
  placeholder, the learned vector in mask_embedding.pt is the mask), target_layer_ids = feature layer - 1}; keys `layers.N.*` with `self_attn.q_norm` / `k_norm`, `fc`, `hidden_norm`, `norm`, `lm_head`
  (always written), `d2t` (reduced vocabulary) and dopd's learned MASK vector as `mask_embedding.pt`.
- DFlash, `sglang` (SGLang `models/dflash.py`): the same layout without `lm_head` and `mask_embedding.pt`: SGLang
  always uses the target's embedding and head and takes the MASK from the embedding row of `mask_token_id`. A
  learned MASK vector (dopd's default once trained) or an own head cannot be represented there and is refused.

Not representable anywhere, hence refused with the reason: feature layer 0 (the embeddings) or L (HF applies the
final norm to hidden_states[L]; servers capture pre-norm layer outputs); EAGLE-3 with other than 3 feature layers
(the servers' `fc` is 3H wide); foreign drafters with flags dopd's modules do not implement (norm_before_residual,
norm_before_fc, fc_norm, norm_output, attention biases, RoPE scaling, a token embedding other than the target's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ModelError
from ..models import TargetInfo
from .base import KINDS, Drafter, DrafterSpec, kind_class, read_drafter_config

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# the speculators EAGLE-3 flags dopd's EAGLE-3 modules have off (written false, refused when true on import)
EAGLE3_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")


def export_formats() -> tuple[str, ...]:
    """Every `dopd export --format` value some registered kind writes, in registration order."""
    return tuple(dict.fromkeys(f for cls in KINDS.values() for f in cls.export_formats))


# ---------------------------------------------------------------------------------------------------------------
# detection


def detect_format(path: str | Path) -> str:
    """`dopd`, or the foreign format a registered kind recognises in a drafter directory's config.json
    (`speculators-eagle3`, `sglang-eagle3`, `vllm-dflash`, ...)."""
    meta = read_drafter_config(path)
    if "dopd_spec_version" in meta:
        return "dopd"
    for cls in KINDS.values():
        fmt = cls.detect_format(meta)
        if fmt is not None:
            return fmt
    known = [f for cls in KINDS.values() for f in cls.import_formats]
    smt = meta.get("speculators_model_type")
    if smt is not None:
        raise ModelError(f"drafter {path} is a speculators '{smt}' model; dopd imports {', '.join(known)}")
    archs = meta.get("architectures") or []
    raise ModelError(
        f"{Path(path) / 'config.json'} is not a drafter dopd knows: no dopd_spec_version, no speculators_model_type "
        f"a kind reads, and architectures {archs} is none a registered kind reads (formats: {', '.join(known)})"
    )


def kind_of_format(fmt: str) -> type[Drafter]:
    """The registered kind that imports foreign format `fmt`."""
    for cls in KINDS.values():
        if fmt in cls.import_formats:
            return cls
    known = [f for cls in KINDS.values() for f in cls.import_formats]
    raise ModelError(f"not an importable format: '{fmt}' (known: {', '.join(known)})")


# ---------------------------------------------------------------------------------------------------------------
# export: shared pieces


def check_feature_layers(spec: DrafterSpec, fmt: str) -> None:
    """Servers capture the outputs of layers 1..L-1: feature layer 0 (embeddings) or L (after the final norm) is
    not representable in any server format."""
    L = spec.target["num_layers"]
    bad = [i for i in spec.feature_layers if i <= 0 or i >= L]
    if bad:
        raise ModelError(
            f"{fmt} cannot represent feature layer(s) {bad} of a {L}-layer target: servers capture the outputs of "
            f"layers 1..{L - 1} (hidden_states index 0 is the embeddings, index {L} is after the final norm)"
        )


def verifier_entry(spec: DrafterSpec, verifier: str | None) -> tuple[str, list[str]]:
    """(name_or_path written into the config, its architectures). A local directory or builtin alias is written as
    an absolute directory and checked against the drafter's target; a hub id is written as given (servers resolve
    it) with the architecture of the drafter's target."""
    from ..models import ALIASES, resolve_target

    name = verifier or spec.target["name"]
    if not (Path(name).expanduser().is_dir() or name in ALIASES):
        return name, [HF_ARCHITECTURES.get(spec.target.get("model_type", ""), "LlamaForCausalLM")]
    path = resolve_target(name, quiet=True)
    cfg = json.loads((Path(path) / "config.json").read_text())
    got = (cfg.get("hidden_size"), cfg.get("vocab_size"), cfg.get("num_hidden_layers"))
    want = (spec.target["hidden_size"], spec.target["vocab_size"], spec.target["num_layers"])
    if got != want:
        raise ModelError(
            f"verifier '{name}' (hidden, vocab, layers) = {got} does not match the drafter's target "
            f"'{spec.target['name']}' {want}"
        )
    archs = cfg.get("architectures") or [HF_ARCHITECTURES.get(cfg.get("model_type", ""), "LlamaForCausalLM")]
    return str(Path(path).resolve()), archs


def vocab_tensors(d: Drafter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ascending draft->target ids, lm_head rows in that order, permutation applied). Servers assume ascending."""
    ids = d.draft_ids.detach().cpu()
    order = torch.argsort(ids)
    head = d.lm_head.weight if d.lm_head is not None else d.head_weight[d.draft_ids]
    return ids[order], head.detach().cpu().float()[order], order


def vocab_maps(ids: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t as int64 OFFSETS: target id = d2t[i] + i, t2d as a bool mask over V) for ascending draft ids."""
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return (ids - torch.arange(ids.numel())).to(torch.int64), t2d


def llama_layer_config(spec: DrafterSpec, max_pos: int, vocab: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "max_position_embeddings": max_pos,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def module_state(d: Drafter) -> dict[str, torch.Tensor]:
    """The drafter's own weights in fp32 (the draft map and own head left out: every format writes them its way)."""
    skip = ("draft_ids", "lm_head.weight")
    return {k: v.detach().cpu().float().contiguous() for k, v in d.state_dict().items() if k not in skip}


def export_drafter(
    d: Drafter, fmt: str, out: str | Path, verifier: str | None = None, speculative_tokens: int = 3
) -> Path:
    """Write drafter `d` in server format `fmt` (one of its kind's `export_formats`) to `out`; refuses what it
    cannot represent, naming it. The kind writes the format (`Drafter.export`)."""
    known = export_formats()
    if fmt not in known:
        raise ModelError(f"unknown export format '{fmt}' (known: {', '.join(known)})")
    spec = d.spec
    cls = kind_class(spec.kind)
    if fmt not in cls.export_formats:
        raise ModelError(
            f"drafter kind '{spec.kind}' has no {fmt} export (its formats: {', '.join(cls.export_formats) or 'none'})"
        )
    check_feature_layers(spec, fmt)
    d.check_export(fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vname, varchs = verifier_entry(spec, verifier)
    d.export(fmt, out, vname, varchs, speculative_tokens)
    return out


# ---------------------------------------------------------------------------------------------------------------
# import: shared pieces


def rope_theta_of(c: dict) -> float:
    rp = c.get("rope_parameters") or {}
    return float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))


def refuse_unsupported_layer_config(c: dict, where: str) -> None:
    if c.get("rope_scaling") or (c.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ModelError(
            f"{where}: RoPE scaling {c.get('rope_scaling') or c.get('rope_parameters')} is not implemented by dopd's drafters"
        )
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ModelError(f"{where}: {key}=true is not implemented by dopd's drafters")
    if c.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act '{c['hidden_act']}' is not implemented by dopd's drafters (silu only)")


def check_target(c: dict, info: TargetInfo, where: str, vocab_key: str = "vocab_size") -> None:
    diffs = []
    if c.get("hidden_size") != info.hidden_size:
        diffs.append(f"hidden size {c.get('hidden_size')} vs the target's {info.hidden_size}")
    if c.get(vocab_key) != info.vocab_size:
        diffs.append(f"vocabulary {c.get(vocab_key)} vs the target's {info.vocab_size}")
    if diffs:
        raise ModelError(f"{where} does not fit target '{info.name}': " + ", ".join(diffs))


def foreign_spec(kind: str, c: dict, info: TargetInfo, feature_layers: list[int], draft_vocab: int, own_head: bool, where: str,
          mask_token_id: int | None = None) -> DrafterSpec:  # fmt: skip
    missing = [
        k for k in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers") if k not in c
    ]
    if missing:
        raise ModelError(f"{where}: its layer config lacks {', '.join(missing)}")
    heads = int(c["num_attention_heads"])
    bad = [i for i in feature_layers if not 0 <= i <= info.num_layers]
    if bad:
        raise ModelError(
            f"{where}: feature layers {bad} out of range for the {info.num_layers}-layer target '{info.name}'"
        )
    reduced = draft_vocab != info.vocab_size
    return DrafterSpec(
        kind=kind,
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        feature_layers=list(feature_layers),
        target_hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        draft_vocab_size=draft_vocab if reduced else None,
        train_lm_head=own_head and not reduced,
        rope_theta=rope_theta_of(c),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        mask_token_id=mask_token_id,
        target=info.to_dict(),
    )


def read_foreign(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"drafter {path} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return meta, state


def _draft_ids(state: dict, V: int, Vd: int, where: str) -> torch.Tensor:
    if Vd == V:
        return torch.arange(V)
    if "d2t" not in state:
        raise ModelError(f"{where}: draft vocabulary {Vd} < target vocabulary {V} but no d2t map")
    d2t = state["d2t"].long()
    if d2t.numel() != Vd:
        raise ModelError(f"{where}: d2t has {d2t.numel()} entries, draft_vocab_size is {Vd}")
    ids = d2t + torch.arange(Vd)  # offsets -> target ids
    if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != Vd:
        raise ModelError(f"{where}: d2t (offsets) maps outside the target vocabulary {V} or twice to one id")
    if "t2d" in state:
        t2d = state["t2d"]
        if t2d.numel() != V or t2d.dtype != torch.bool or not torch.equal(t2d.nonzero().flatten(), ids.sort().values):
            raise ModelError(f"{where}: t2d is not the bool mask of the d2t ids over the {V}-token target vocabulary")
    return ids


def _check_embed(state: dict, embed_weight: torch.Tensor, where: str) -> None:
    e = state.get("embed_tokens.weight")
    if e is None:
        return
    if e.shape != embed_weight.shape or not torch.allclose(
        e.float(), embed_weight.detach().cpu().float(), atol=1e-2, rtol=1e-2
    ):
        raise ModelError(
            f"{where}: its embed_tokens.weight {tuple(e.shape)} differs from the target's token embedding "
            f"{tuple(embed_weight.shape)}; dopd drafters use the target's frozen embedding"
        )


def load_foreign(
    kind_cls, spec: DrafterSpec, embed_weight, head_weight, draft_ids, body: dict, head: torch.Tensor | None, where: str
) -> Drafter:
    model = kind_cls(spec, embed_weight, head_weight, draft_ids)
    own = {k: v for k, v in body.items()}
    if model.lm_head is not None:
        if head is None:
            raise ModelError(f"{where}: a reduced draft vocabulary needs lm_head.weight")
        own["lm_head.weight"] = head
    own["draft_ids"] = draft_ids
    want = model.state_dict()
    missing = sorted(set(want) - set(own))
    unexpected = sorted(set(own) - set(want))
    if missing or unexpected:
        raise ModelError(
            f"{where}: weights do not fit dopd's {spec.kind} drafter (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ModelError(f"{where}: {k} has shape {tuple(v.shape)}, the config implies {tuple(want[k].shape)}")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in own.items()})
    return model.to(torch.float32)


def finish_import(
    cls: type[Drafter], c: dict, state: dict, info: TargetInfo, embed_weight, head_weight, layers: list[int], Vd: int,
    body: dict, where: str, mask_token_id: int | None = None,
) -> Drafter:  # fmt: skip
    """The part of every import after the kind has read its layout: embedding and draft map checked against the
    target, the head kept as the target's when it equals it (else the drafter's own), the modules loaded."""
    _check_embed(state, embed_weight, where)
    draft_ids = _draft_ids(state, info.vocab_size, Vd, where)
    head = state.get("lm_head.weight")
    if head is not None and head.shape != (Vd, info.hidden_size):
        raise ModelError(
            f"{where}: lm_head.weight {tuple(head.shape)} vs draft vocabulary {Vd} x hidden {info.hidden_size}"
        )
    # a full-vocabulary head equal to the target's stays the target's (frozen); a different one is the drafter's own
    own_head = head is not None and (
        Vd != info.vocab_size or not torch.allclose(head.float(), head_weight.detach().cpu().float(), atol=1e-6)
    )
    spec = foreign_spec(cls.kind, c, info, layers, Vd, own_head, where, mask_token_id)
    if spec.hidden_size != info.hidden_size:
        raise ModelError(
            f"{where}: drafter hidden size {spec.hidden_size} differs from the target's {info.hidden_size}"
        )
    return load_foreign(cls, spec, embed_weight, head_weight, draft_ids, body, head if own_head else None, where)


def import_drafter(
    path: str | Path, info: TargetInfo, embed_weight: torch.Tensor, head_weight: torch.Tensor, fmt: str | None = None
) -> Drafter:
    """A dopd drafter from a foreign drafter directory (any format a registered kind reads), checked against the
    target `info` (shapes, vocabulary, feature layers, embedding)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    cls = kind_of_format(fmt)
    meta, state = read_foreign(path)
    return cls.import_format(fmt, path, meta, state, info, embed_weight, head_weight)
