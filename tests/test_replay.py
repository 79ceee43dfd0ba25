"""Error-position replay: anchors are exactly the rejection positions; the target scores every block."""

from __future__ import annotations

import numpy as np
import torch

from dopd.actors.replay import Replayer, choose_anchors
from dopd.actors.rollout import error_positions, rollout, rollout_blocks
from dopd.common.config import Config
from dopd.common.specdec import SeqResult, StepRecord


def step(prefix, accepted, K=4, committed=None):
    mask = np.arange(K) < accepted
    z = np.zeros(K, dtype=np.float32)
    return StepRecord(prefix, np.arange(K), z + 1, z, np.zeros((K, 2), np.int32), np.zeros((K, 2), np.float32), z, z, mask, committed or [0] * (accepted + 1))


def test_error_anchors_are_the_rejection_positions():
    # prompt of 10; steps: accepted 2 (rejects position 12), all 4 (no error), 0 (rejects 16), 1 (rejects 18)
    steps = [step(10, 2), step(13, 4), step(18 - 2, 0), step(17, 1)]
    seq = SeqResult(0, list(range(10)), list(range(12)), steps=steps)
    assert error_positions(seq).tolist() == [12, 16, 18]
    rng = np.random.default_rng(0)
    assert choose_anchors(seq, "error", 2, 64, rng).tolist() == [12, 16, 18]
    rnd = choose_anchors(seq, "random", 2, 64, rng)
    assert len(rnd) == 3 and len(set(rnd.tolist())) == 3 and all(10 <= a < 22 for a in rnd)
    assert choose_anchors(seq, "all", 2, 64, rng).tolist() == list(range(10, 22))
    assert choose_anchors(seq, "all", 2, 5, rng).size == 5
    assert choose_anchors(seq, "none", 2, 64, rng).size == 0
    # a rejection beyond the final length (the sequence was cut at EOS/length) is not an anchor
    seq_cut = SeqResult(0, list(range(10)), list(range(5)), steps=[step(10, 2), step(13, 2)])
    assert error_positions(seq_cut).tolist() == [12]


def test_replay_blocks_are_scored_by_the_target(tiny, tiny_prompts, trained_tiny_drafter):
    cfg = Config()
    cfg.rollout.max_new_tokens = 32
    seqs, _ = rollout(tiny, trained_tiny_drafter, tiny_prompts[:3], cfg.rollout, seed=0)
    rng = np.random.default_rng(0)
    anchors = [choose_anchors(s, "error", 2, 64, rng) for s in seqs]
    assert sum(a.size for a in anchors) > 0
    blocks, stats = Replayer(tiny, cfg.replay, cfg.rollout, batch_size=2).replay(trained_tiny_drafter, seqs, anchors, seed=0)
    assert stats.anchors == sum(a.size for a in anchors)
    for s, b, a in zip(seqs, blocks, anchors):
        assert b.anchor.tolist() == a.tolist() and (b.source == 1).all()
        toks = s.prompt_ids + s.output_ids
        for j in range(len(b)):
            anchor, d = int(b.anchor[j]), b.draft_tokens[j].tolist()
            # brute force: the target's distribution at every block position, one forward per block
            with torch.no_grad():
                logits = tiny.model(torch.tensor([toks[:anchor] + d[:-1]])).logits[0, anchor - 1 :].float()
            lsm = torch.log_softmax(logits, -1)
            top = lsm.topk(b.target_topk_ids.shape[-1], -1)
            np.testing.assert_array_equal(top.indices.numpy(), b.target_topk_ids[j])
            np.testing.assert_allclose(top.values.exp().numpy(), b.target_topk_probs[j], atol=1e-4)
            np.testing.assert_allclose(lsm.gather(-1, torch.tensor(d)[:, None]).squeeze(-1).exp().numpy(), b.target_draft_prob[j], atol=1e-4)
            # greedy verification rule on the replayed block
            ok = (torch.tensor(d) == logits.argmax(-1)).long().cumprod(0).bool().numpy()
            np.testing.assert_array_equal(ok, b.accept_mask[j])
            # replay starts where the rollout was rejected: the target's first choice is the committed token
            assert b.target_topk_ids[j, 0, 0] == toks[anchor]
    rb = rollout_blocks(seqs[0])
    assert (rb.source == 0).all() and len(rb) == len(seqs[0].steps)
