"""Drafters leave dopd and come back: exports load in an independent implementation (PyPI `speculators` 0.9.0,
pure torch) and give dopd's own logits; imports give identical logits and train; refusals name what they refuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # speculators reads the verifier named in the config: a local directory only

try:
    import speculators  # noqa: F401
except ImportError as e:  # a failure, not a skip: the interop checks are the point of this file
    raise ImportError(
        "tests/test_export.py needs speculators 0.9.0: run `make setup` (it installs it with --no-deps)"
    ) from e

from helpers import features, random_drafter, target_states  # noqa: E402

from dopd.common.drafters import export_drafter, load_drafter  # noqa: E402
from dopd.common.errors import ModelError  # noqa: E402

TOL = 1e-4
S, K = 24, 3


@pytest.fixture(scope="module")
def batch(tiny):
    return target_states(tiny, S)


def dopd_eagle3_logits(d, tok, hs):
    """dopd's teacher-forced TTT logits for blocks anchored at a = 2 .. S-K, draft ids in ascending target order."""
    a = torch.arange(2, S - K + 1)
    bt = torch.stack([tok[0, x : x + K] for x in a])[None]
    with torch.no_grad():
        lg = d.logits(d.block_hidden(tok, features(d, hs), torch.tensor([S]), a[None], bt))[0]
    return lg[..., torch.argsort(d.draft_ids)]  # [M, K, Vd]


def load_speculators(path, kind="eagle3"):
    if kind == "eagle3":
        from speculators.models.eagle3 import Eagle3DraftModel as M
        from speculators.models.eagle3 import Eagle3SpeculatorConfig as C
    else:
        from speculators.models.dflash import DFlashDraftModel as M
        from speculators.models.dflash import DFlashSpeculatorConfig as C
    cfg = C.from_pretrained(str(path))
    cfg.transformer_layer_config._attn_implementation = "eager"  # CPU: no flex attention
    return M.from_pretrained(str(path), config=cfg).eval()


def speculators_eagle3_logits(m, tok, hs, layer_ids):
    """speculators' own TTT forward (entry i = token x_{i+1} with feature f_i at position i+1), its lm_head outputs
    captured per step; rows i = a-2 of dopd's blocks."""
    feat = torch.cat([hs[i] for i in layer_ids], -1)
    caps = []
    h = m.lm_head.register_forward_hook(lambda mod, i, o: caps.append(o.detach()))
    with torch.no_grad():
        m(
            hidden_states=feat[:, :-1],
            input_ids=tok[:, 1:],
            document_ids=torch.zeros(1, S - 1, dtype=torch.long),
            ttt_steps=K,
        )
    h.remove()
    return torch.stack(caps, 2)[0][torch.arange(2, S - K + 1) - 2]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
def test_eagle3_speculators_export_matches_independent_forward(tiny, batch, tmp_path, layers, reduced):
    d = random_drafter(tiny, layers=layers, reduced=reduced)
    export_drafter(d, "speculators", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3Speculator"] and cfg["eagle_aux_hidden_state_layer_ids"] == d.feature_layers
    assert {k: cfg[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")} == dict.fromkeys(
        ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"), False)  # fmt: skip
    assert cfg["transformer_layer_config"]["head_dim"] == d.spec.head_dim
    assert Path(cfg["speculators_config"]["verifier"]["name_or_path"]) == tiny.path.resolve()
    m = load_speculators(tmp_path)
    assert m.use_draft_vocab == reduced and len(m.layers) == layers
    if reduced:  # d2t offsets, t2d a bool mask (checked by speculators' loader too)
        assert m.d2t.dtype == torch.int64 and m.t2d.dtype == torch.bool
        assert torch.equal(m.d2t + torch.arange(100), d.draft_ids.sort().values)
    ours, theirs = (
        dopd_eagle3_logits(d, *batch),
        speculators_eagle3_logits(m, *batch, cfg["eagle_aux_hidden_state_layer_ids"]),
    )
    err = (ours - theirs).abs().max().item()
    print(f"eagle3 speculators layers={layers} reduced={reduced}: max |logit diff| = {err:.2e}")
    assert err < TOL


def test_wrong_norm_flag_is_detected(tiny, batch, tmp_path):
    """The comparison can fail: the same weights under norm_before_residual=true give other logits, and dopd's
    importer refuses that flag by name."""
    d = random_drafter(tiny)
    export_drafter(d, "speculators", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["norm_before_residual"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = speculators_eagle3_logits(load_speculators(tmp_path), *batch, d.feature_layers)
    assert (dopd_eagle3_logits(d, *batch) - theirs).abs().max().item() > 100 * TOL
    with pytest.raises(ModelError, match="norm_before_residual=true"):
        load_drafter(tmp_path, tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)


def test_sglang_export_matches_after_speculators_converter(tiny, batch, tmp_path):
    """SGLang layout (midlayer.*, layer ids one less than HF's) -> speculators' own Eagle3Converter -> same logits."""
    from speculators.convert.eagle.eagle3_converter import Eagle3Converter

    d = random_drafter(tiny, reduced=True)
    export_drafter(d, "sglang", tmp_path / "sg")
    cfg = json.loads((tmp_path / "sg" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["rope_scaling"] is None
    sglang_ids = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert sglang_ids == [i - 1 for i in d.feature_layers]
    Eagle3Converter().convert(tmp_path / "sg", tmp_path / "conv", base_model=str(tiny.path), validate=False,
                              eagle_aux_hidden_state_layer_ids=[i + 1 for i in sglang_ids])  # SGLang adds 1  # fmt: skip
    err = (
        (
            dopd_eagle3_logits(d, *batch)
            - speculators_eagle3_logits(load_speculators(tmp_path / "conv"), *batch, d.feature_layers)
        )
        .abs()
        .max()
        .item()
    )
    print(f"eagle3 sglang -> speculators converter: max |logit diff| = {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("layers", [1, 2])
def test_dflash_vllm_export_matches_speculators_dflash(tiny, batch, tmp_path, layers, monkeypatch):
    """vLLM/z-lab DFlash layout -> speculators' own DFlashConverter -> its DFlashDraftModel block forward at the
    same anchors gives dopd's logits. The MASK is the embedding row of mask_token_id here (z-lab's rule), which
    dopd's learned vector starts as."""
    import speculators.models.dflash.core as core
    from speculators.convert.dflash.converter import DFlashConverter

    tok, hs = batch
    d = random_drafter(tiny, kind="dflash", layers=layers, mask_token_id=3)
    export_drafter(d, "vllm", tmp_path / "zlab", speculative_tokens=K)
    cfg = json.loads((tmp_path / "zlab" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["block_size"] == K + 1
    assert cfg["dflash_config"] == {"mask_token_id": 3, "target_layer_ids": [i - 1 for i in d.feature_layers]}
    assert torch.equal(torch.load(tmp_path / "zlab" / "mask_embedding.pt"), d.mask_embedding.weight.detach())
    DFlashConverter().convert(tmp_path / "zlab", tmp_path / "conv", base_model=str(tiny.path), validate=False)
    m = load_speculators(tmp_path / "conv", "dflash")
    starts = torch.arange(1, S - K - 1)  # block start p = a - 1 (the anchor token's own position)
    monkeypatch.setattr(
        core, "select_anchors", lambda lm, n, bs: (starts.clone(), torch.ones(len(starts), dtype=torch.bool))
    )
    with torch.no_grad():
        _, theirs, *_ = m._backbone_forward(
            features(d, hs), tok, torch.ones(1, S), hs[-1], torch.zeros(1, S, dtype=torch.long), max_anchors=len(starts)
        )
        a = starts + 1
        ours = d.logits(
            d.block_hidden(
                tok, features(d, hs), torch.tensor([S]), a[None], torch.zeros(1, len(a), K, dtype=torch.long)
            )
        )[0]
    theirs = theirs.view(len(starts), K + 1, -1)[:, 1:]
    err = (ours - theirs).abs().max().item()
    print(f"dflash vllm -> speculators converter layers={layers}: max |logit diff| = {err:.2e}")
    assert err < TOL


# --- round trips ----------------------------------------------------------------------------------------------


def full_logits(d, tok, hs, K=3):
    """Logits over the TARGET vocabulary (-inf outside the draft vocabulary), so drafters whose draft ids are
    ordered differently compare."""
    a = torch.arange(2, S - K + 1)
    bt = torch.stack([tok[0, x : x + K] for x in a])[None]
    with torch.no_grad():
        lg = d.logits(d.block_hidden(tok, features(d, hs), torch.tensor([S]), a[None], bt))[0]
    out = torch.full((*lg.shape[:-1], d.spec.vocab_size), float("-inf"))
    out[..., d.draft_ids] = lg
    return out


@pytest.mark.parametrize(
    "kind,fmt,layers,reduced",
    [("eagle3", "speculators", 1, True), ("eagle3", "speculators", 2, False), ("eagle3", "sglang", 1, True),
     ("dflash", "vllm", 2, True), ("dflash", "speculators", 1, False)],
)  # fmt: skip
def test_export_import_round_trip_identical_logits(tiny, batch, tmp_path, kind, fmt, layers, reduced):
    d = random_drafter(tiny, kind=kind, layers=layers, reduced=reduced)
    if kind == "dflash":
        with torch.no_grad():
            d.mask_embedding.weight.add_(0.1)  # a learned MASK vector that is no embedding row: must survive
    export_drafter(d, fmt, tmp_path)
    back = load_drafter(tmp_path, tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert type(back) is type(d) and back.feature_layers == d.feature_layers and back.draft_vocab == d.draft_vocab
    assert torch.equal(full_logits(back, *batch), full_logits(d, *batch))
    back.save_pretrained(tmp_path / "dopd")  # and it is a dopd drafter again
    again = load_drafter(tmp_path / "dopd", tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert torch.equal(full_logits(again, *batch), full_logits(d, *batch))


def test_dflash_sglang_export_when_the_mask_is_an_embedding_row(tiny, batch, tmp_path):
    """SGLang's DFlash can hold a drafter whose MASK is still the embedding row of mask_token_id and whose head is
    the target's: no lm_head, no mask_embedding.pt; re-imported, the mask comes from that row, logits identical."""
    d = random_drafter(tiny, kind="dflash", mask_token_id=3)
    export_drafter(d, "sglang", tmp_path)
    assert not (tmp_path / "mask_embedding.pt").exists()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "layers.0.self_attn.q_norm.weight" in f.keys()
    back = load_drafter(tmp_path, tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert torch.equal(full_logits(back, *batch), full_logits(d, *batch))
    with torch.no_grad():
        d.mask_embedding.weight.add_(0.01)  # trained MASK vector: no longer representable
    with pytest.raises(ModelError, match="learned vector"):
        export_drafter(d, "sglang", tmp_path / "x")


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,fmt,cfg,layers,match",
    [
        ("eagle3", "speculators", {"feature_layers": [0, 4, 5]}, 1, r"feature layer\(s\) \[0\]"),
        ("eagle3", "sglang", {"feature_layers": [2, 4, 8]}, 1, r"feature layer\(s\) \[8\]"),
        ("eagle3", "speculators", {"feature_layers": [1, 2, 4, 5]}, 1, "4 feature layers"),
        ("eagle3", "sglang", {}, 2, "2-layer EAGLE-3"),
        ("dflash", "sglang", {}, 1, "learned vector"),
        ("dflash", "sglang", {"mask_token_id": 3, "train_lm_head": True}, 1, "own LM head"),
        ("eagle3", "gguf", {}, 1, "unknown export format 'gguf'"),
    ],
)  # fmt: skip
def test_unrepresentable_drafters_are_refused(tiny, tmp_path, kind, fmt, cfg, layers, match):
    d = random_drafter(tiny, kind=kind, layers=layers, **cfg)
    with pytest.raises(ModelError, match=match):
        export_drafter(d, fmt, tmp_path)


def test_import_checks_shapes_vocabulary_and_embedding(tiny, tmp_path):
    from dopd.common.models import load_target

    d = random_drafter(tiny, reduced=True)
    export_drafter(d, "speculators", tmp_path / "ok")

    def edited(name, edit):
        out = tmp_path / name
        export_drafter(d, "speculators", out)
        cfg = json.loads((out / "config.json").read_text())
        edit(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
        return out

    io = (tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    with pytest.raises(ModelError, match="vocabulary 300 vs the target's 260"):
        load_drafter(edited("vocab", lambda c: c["transformer_layer_config"].update(vocab_size=300)), *io)
    with pytest.raises(ModelError, match="hidden size 128 vs the target's 64"):
        load_drafter(edited("hidden", lambda c: c["transformer_layer_config"].update(hidden_size=128)), *io)
    with pytest.raises(ModelError, match=r"feature layers \[9\] out of range for the 8-layer target"):
        load_drafter(edited("layers", lambda c: c.update(eagle_aux_hidden_state_layer_ids=[2, 4, 9])), *io)
    with pytest.raises(ModelError, match="d2t has 100 entries, draft_vocab_size is 90"):
        load_drafter(edited("dv", lambda c: c.update(draft_vocab_size=90)), *io)
    other = load_target("tiny-random-qwen2")  # same shapes, other random embedding
    with pytest.raises(ModelError, match="embed_tokens.weight .* differs from the target's token embedding"):
        load_drafter(tmp_path / "ok", other.info, other.embed_tokens.weight, other.lm_head.weight)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match="not a drafter dopd knows"):
        load_drafter(tmp_path / "junk", *io)


# --- an imported drafter trains, evaluates the same, and the CLI -------------------------------------------------


@pytest.mark.heavy
def test_imported_speculators_checkpoint_trains_one_opd_step(tiny, tmp_path):
    from dopd.common.load import load_config
    from dopd.local import InProcess
    from dopd.train import train

    d = random_drafter(tiny, reduced=True)
    export_drafter(d, "speculators", tmp_path / "spec")
    before = load_drafter(tmp_path / "spec", tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight).state_dict()
    cfg = load_config(None, [
        "model.target=tiny-random-llama", "data.prompts=champ-problems", "data.num_eval=4", "mode=opd",
        f"drafter.init={tmp_path / 'spec'}", "sft.warmup_steps=0", "learner.steps=1", "rollout.max_new_tokens=16",
        "learner.micro_batch_size=2", "learner.eval_every=100", "learner.checkpoint_every=100", "eval.num_prompts=2",
        "eval.max_new_tokens=8", f"out_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    tr = InProcess(cfg, target=tiny, log=lambda *a: None)
    assert tr.drafter.draft_vocab == 100
    train(cfg, tr)
    steps = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if json.loads(x)["event"] == "step"]
    assert [s["phase"] for s in steps] == ["opd"] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    after = tr.drafter.state_dict()
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].detach().cpu().float())]
    assert any(k.startswith("layers.0.") for k in changed) and "draft_ids" not in changed


@pytest.mark.heavy
def test_cli_export_and_eval_same_tau_after_reimport(trained_tiny_drafter, tmp_path):
    """`dopd eval` at T = 0 of a trained drafter and of its speculators export (re-imported on load) give the same
    tau; `dopd export` names what it refuses."""
    from typer.testing import CliRunner

    from dopd.cli import app

    runner = CliRunner()
    trained_tiny_drafter.save_pretrained(tmp_path / "dopd")
    r = runner.invoke(
        app, ["export", str(tmp_path / "dopd"), "--format", "speculators", "--out", str(tmp_path / "spec")]
    )
    assert r.exit_code == 0, r.output
    assert "exported eagle3 drafter" in r.output and (tmp_path / "spec" / "model.safetensors").is_file()
    taus = []
    for name in ("dopd", "spec"):
        out = tmp_path / f"{name}.json"
        r = runner.invoke(app, ["eval", "--target", "tiny-random-llama", "--drafter", str(tmp_path / name), "--prompts", "champ-problems",
                                "--num-prompts", "4", "--max-new-tokens", "24", "--block-size", "4", "--no-baseline", "--json", str(out)])  # fmt: skip
        assert r.exit_code == 0, r.output
        rep = json.loads(out.read_text())
        taus.append((rep["tau"], rep["alpha"], rep["num_steps"]))
    print(f"dopd eval tau: dopd drafter {taus[0][0]:.4f}, speculators export re-imported {taus[1][0]:.4f}")
    assert taus[0] == taus[1] and taus[0][0] > 1.2
    r = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "dopd"),
            "--format",
            "sglang",
            "--out",
            str(tmp_path / "sg"),
            "--verifier",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2 and "no config.json" in r.output
    r = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "dopd"),
            "-f",
            "speculators",
            "-o",
            str(tmp_path / "hub"),
            "--verifier",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ],
    )
    assert r.exit_code == 0, r.output  # a hub id is written as given (no hub here): the server resolves it
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["speculators_config"]["verifier"] == {
        "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "architectures": ["LlamaForCausalLM"],
    }
    r = runner.invoke(app, ["export", str(tmp_path / "spec"), "--format", "sglang", "--out", str(tmp_path / "sg")])
    assert r.exit_code == 2 and "pass --target" in r.output
    r = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "spec"),
            "--format",
            "sglang",
            "--out",
            str(tmp_path / "sg"),
            "--target",
            "tiny-random-llama",
        ],
    )
    assert r.exit_code == 0, r.output
