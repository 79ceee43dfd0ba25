"""The P-EAGLE kind (common/drafters/peagle.py): its training forward is its inference forward, its speculators
export loads in speculators' own `PEagleDraftModel` (0.9.0, pure torch) with dopd's logits, it comes back with
identical logits, and a tiny `dopd train` trains it."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # speculators reads the verifier named in the config: a local directory only

from helpers import features, random_drafter, target_states  # noqa: E402

from dopd.common.config import DrafterConfig  # noqa: E402
from dopd.common.drafters import KINDS, build_drafter, export_drafter, load_drafter  # noqa: E402
from dopd.common.drafters.peagle import PEagleDrafter  # noqa: E402
from dopd.common.errors import ModelError  # noqa: E402
from dopd.common.specdec import DecodeSettings, SpecEngine  # noqa: E402

TOL = 1e-4
S, K = 24, 4
STARTS = [0, 3, 7, 12, 18]  # speculators' anchor indices (its entry i = dopd's entry i + 1): dopd anchors i + 2


def random_peagle(tiny, layers=1, reduced=False, seed=0, mask_token_id=5):
    """Every weight perturbed (norms and mask_hidden included), a RoPE base other than the target's, and when
    reduced an UNSORTED draft vocabulary."""
    return random_drafter(tiny, "peagle", layers, reduced, seed, spec={"mask_token_id": mask_token_id})


@pytest.fixture(scope="module")
def batch(tiny):
    return target_states(tiny, S)


def dopd_logits(d, tok, hs, sort=True):
    a = torch.tensor(STARTS) + 2
    with torch.no_grad():
        lg = d.logits(
            d.block_hidden(tok, features(d, hs), torch.tensor([S]), a[None], torch.zeros(1, len(a), K).long())
        )
    return lg[0][..., torch.argsort(d.draft_ids)] if sort else lg[0]  # [M, K, Vd]


def speculators_logits(path, tok, hs, layer_ids, monkeypatch):
    """speculators' own P-EAGLE training forward, its COD sampling replaced by every depth 1..K-1 at STARTS; the
    lm_head output captured and laid out [M, K, Vd] (row = anchor, column = depth)."""
    import speculators.models.peagle.core as core
    from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig

    cfg = PEagleSpeculatorConfig.from_pretrained(str(path))
    cfg.transformer_layer_config._attn_implementation = "eager"  # CPU: no flex attention
    m = PEagleDraftModel.from_pretrained(str(path), config=cfg).eval()
    n = S - 1
    starts = torch.tensor(STARTS)
    anchor = torch.cat([torch.arange(n)] + [starts] * (K - 1))
    depth = torch.cat([torch.zeros(n, dtype=torch.long)] + [torch.full((len(starts),), j) for j in range(1, K)])
    monkeypatch.setattr(core, "generate_cod_sample_indices", lambda **kw: (anchor, depth))
    monkeypatch.setattr(core, "compute_metrics", lambda **kw: (torch.tensor(0.0), {}))  # its loss needs Triton
    caps = []
    hook = m.lm_head.register_forward_hook(lambda mod, i, o: caps.append(o.detach()))
    with torch.no_grad():
        m(
            hidden_states=torch.cat([hs[i] for i in layer_ids], -1)[:, :-1],
            input_ids=tok[:, 1:],
            document_ids=torch.zeros(1, n, dtype=torch.long),
            verifier_last_hidden_states=hs[-1][:, 1:],
            num_depths=K,
        )
    hook.remove()
    out = caps[0][0]  # [total_sampled, Vd]
    rows = [out[starts]] + [out[n + (j - 1) * len(starts) + torch.arange(len(starts))] for j in range(1, K)]
    return torch.stack(rows, 1), m


def test_peagle_is_registered_with_its_defaults(tiny):
    from dopd.common.load import load_config

    assert KINDS["peagle"] is PEagleDrafter
    cfg = load_config(None, ["model.target=tiny-random-llama", "drafter.kind=peagle"])
    assert (cfg.loss.objective, cfg.loss.response, cfg.loss.acc_divergence, cfg.loss.lambda_rej) == (
        "opd", "blocks", "bernoulli", 1.0)  # fmt: skip
    assert sorted(cfg.loss.records) == ["blocks", "scored"]  # the objective's declaration for these settings


@pytest.mark.parametrize("layers,vocab", [(1, None), (2, 128)])
def test_peagle_training_forward_equals_inference(tiny, tiny_prompts, layers, vocab):
    counts = torch.randint(0, 100, (tiny.info.vocab_size,), generator=torch.Generator().manual_seed(0))
    cfg = DrafterConfig(kind="peagle", num_layers=layers, draft_vocab_size=vocab)
    d = build_drafter(cfg, tiny.info, tiny.model.config, tiny.embed_tokens.weight, tiny.lm_head.weight, counts, seed=3)
    res, _ = SpecEngine(tiny, d).generate(
        tiny_prompts[:3], DecodeSettings(block_size=K, max_new_tokens=24, batch_size=2, record=True, keep_features=True)
    )
    for r in res:
        seq = torch.tensor([r.prompt_ids + r.output_ids])
        f = torch.zeros(1, seq.shape[1], r.features.shape[1])
        f[0, : r.features.shape[0]] = r.features
        anchors = torch.tensor([[st.prefix_len for st in r.steps]])
        blocks = torch.tensor([[list(st.draft_tokens) for st in r.steps]])
        lg = d.logits(d.block_hidden(seq, f, torch.tensor([seq.shape[1]]), anchors, blocks))
        train_lp = torch.log_softmax(lg.float(), -1).gather(-1, d.t2d[blocks][..., None]).squeeze(-1)
        torch.testing.assert_close(train_lp, torch.tensor([[list(st.draft_logprobs) for st in r.steps]]), atol=2e-4,
                                   rtol=1e-4)  # fmt: skip
        assert torch.equal(d.draft_ids[lg.argmax(-1)], blocks)
        ids, _, _ = d.draft_blocks(seq, f, torch.tensor([seq.shape[1]]), anchors, K)
        assert torch.equal(ids, blocks)  # replay drafting = the engine's drafts


@pytest.mark.parametrize("layers,reduced", [(1, False), (2, True)])
def test_peagle_speculators_export_matches_speculators_forward(tiny, batch, tmp_path, monkeypatch, layers, reduced):
    d = random_peagle(tiny, layers=layers, reduced=reduced)
    export_drafter(d, "speculators", tmp_path, speculative_tokens=K)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["PEagleSpeculator"] and cfg["speculators_model_type"] == "peagle"
    assert cfg["mask_token_id"] == 5 and cfg["eagle_aux_hidden_state_layer_ids"] == d.feature_layers
    theirs, m = speculators_logits(tmp_path, *batch, cfg["eagle_aux_hidden_state_layer_ids"], monkeypatch)
    assert len(m.layers) == layers and m.use_draft_vocab == reduced
    assert torch.equal(m.mask_hidden.detach().flatten(), d.mask_hidden.weight.detach())
    err = (dopd_logits(d, *batch) - theirs).abs().max().item()
    print(f"peagle speculators layers={layers} reduced={reduced}: max |logit diff| = {err:.2e}")
    assert err < TOL


def test_peagle_comparison_can_fail(tiny, batch, tmp_path, monkeypatch):
    """Another mask token in the exported config gives other logits at the parallel depths (and only there)."""
    d = random_peagle(tiny)
    export_drafter(d, "speculators", tmp_path, speculative_tokens=K)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mask_token_id"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs, _ = speculators_logits(tmp_path, *batch, d.feature_layers, monkeypatch)
    diff = (dopd_logits(d, *batch) - theirs).abs()
    assert diff[:, 0].max().item() < TOL and diff[:, 1:].max().item() > 100 * TOL


def test_peagle_round_trip_and_refusals(tiny, batch, tmp_path):
    d = random_peagle(tiny, reduced=True)
    export_drafter(d, "speculators", tmp_path / "spec", speculative_tokens=K)
    back = load_drafter(tmp_path / "spec", tiny.info, tiny.embed_tokens.weight, tiny.lm_head.weight)
    assert type(back) is PEagleDrafter and back.mask_token == 5
    assert torch.equal(dopd_logits(back, *batch), dopd_logits(d, *batch))
    with pytest.raises(ModelError, match="kind 'peagle' has no sglang export"):
        export_drafter(d, "sglang", tmp_path / "sg")
    with pytest.raises(ModelError, match="mask_token_id 99999 is outside"):
        random_peagle(tiny, mask_token_id=99999)


@pytest.mark.heavy
def test_tiny_dopd_train_peagle(tmp_path):
    """`dopd train drafter.kind=peagle`: SFT warm-up, then Draft-OPD rounds on the rollout's blocks (its recipe),
    then the trained drafter exports and loads in speculators."""
    import yaml
    from typer.testing import CliRunner

    from dopd.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--threads", "2", "--out", str(out), "model.target=tiny-random-llama",
                                 "data.prompts=champ-problems", "data.num_eval=4", "drafter.kind=peagle",
                                 "sft.warmup_steps=2", "learner.steps=3", "learner.refresh_every=1",
                                 "learner.eval_every=5", "learner.micro_batch_size=2", "rollout.max_new_tokens=16",
                                 "sft.max_new_tokens=16", "eval.max_new_tokens=8"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if x.get("event") == "step"]
    assert [x["phase"] for x in steps] == ["sft"] * 2 + ["opd"] * 3
    assert all(x["loss"] > 0 for x in steps) and any(x["n_rej"] > 0 for x in steps[2:])  # both streams trained
    assert yaml.safe_load((out / "config.yaml").read_text())["drafter"]["kind"] == "peagle"
    r = CliRunner().invoke(app, ["export", str(out / "drafter"), "--format", "speculators", "--out",
                                 str(tmp_path / "exp")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["speculators_model_type"] == "peagle"
