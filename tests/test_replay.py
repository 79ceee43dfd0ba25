"""Error-position replay: anchors are exactly the rejection positions; the target scores every block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dopd.actors.replay import Replayer, choose_anchors
from dopd.actors.rollout import Rolled, engine_rollout, error_positions
from dopd.common.config import Config
from dopd.common.record import Blocks


def rolled(prompt_len, answer_len, steps, K=4):
    """A Rolled sequence whose blocks are (prefix, accepted) pairs."""
    b = Blocks.empty(K, 2)
    M = len(steps)
    b = Blocks(**{f: np.zeros((M,) + getattr(b, f).shape[1:], dtype=getattr(b, f).dtype) for f in Blocks.FIELDS})
    b.anchor[:] = [a for a, _ in steps]
    b.accept_mask[:] = np.arange(K)[None, :] < np.asarray([n for _, n in steps])[:, None]
    return Rolled(
        "p", list(range(prompt_len + answer_len)), prompt_len, torch.zeros(prompt_len + answer_len, 1), b, scored=True
    )


def test_error_anchors_are_the_rejection_positions():
    # prompt of 10; steps: accepted 2 (rejects position 12), all 4 (no error), 0 (rejects 16), 1 (rejects 18)
    seq = rolled(10, 12, [(10, 2), (13, 4), (16, 0), (17, 1)])
    assert error_positions(seq).tolist() == [12, 16, 18]
    rng = np.random.default_rng(0)
    assert choose_anchors(seq, "error", 2, 64, rng).tolist() == [12, 16, 18]
    rnd = choose_anchors(seq, "random", 2, 64, rng)
    assert len(rnd) == 3 and len(set(rnd.tolist())) == 3 and all(10 <= a < 22 for a in rnd)
    assert choose_anchors(seq, "all", 2, 64, rng).tolist() == list(range(10, 22))
    assert choose_anchors(seq, "all", 2, 5, rng).size == 5
    assert choose_anchors(seq, "none", 2, 64, rng).size == 0
    # a rejection beyond the final length (the sequence was cut at EOS/length) is not an anchor
    seq_cut = rolled(10, 5, [(10, 2), (13, 2)])
    assert error_positions(seq_cut).tolist() == [12]


@pytest.mark.heavy
def test_replay_blocks_are_scored_by_the_target(tiny, tiny_prompts, trained_tiny_drafter):
    cfg = Config()
    cfg.rollout.max_new_tokens = 32
    seqs, _ = engine_rollout(
        tiny, trained_tiny_drafter, [(str(i), p) for i, p in enumerate(tiny_prompts[:3])], cfg.rollout, seed=0
    )
    rng = np.random.default_rng(0)
    anchors = [choose_anchors(s, "error", 2, 64, rng) for s in seqs]
    assert sum(a.size for a in anchors) > 0
    blocks, stats = Replayer(tiny, cfg.replay, cfg.rollout, batch_size=2).replay(
        trained_tiny_drafter, seqs, anchors, seed=0
    )
    assert stats.anchors == sum(a.size for a in anchors)
    for s, b, a in zip(seqs, blocks, anchors):
        assert b.anchor.tolist() == a.tolist() and (b.source == 1).all() and (b.streams == 3).all()
        toks = s.tokens
        for j in range(len(b)):
            anchor, d = int(b.anchor[j]), b.draft_tokens[j].tolist()
            # brute force: the target's distribution at every block position, one forward per block
            with torch.no_grad():
                logits = tiny.model(torch.tensor([toks[:anchor] + d[:-1]])).logits[0, anchor - 1 :].float()
            lsm = torch.log_softmax(logits, -1)
            top = lsm.topk(b.target_topk_ids.shape[-1], -1)
            np.testing.assert_array_equal(top.indices.numpy(), b.target_topk_ids[j])
            np.testing.assert_allclose(top.values.exp().numpy(), b.target_topk_probs[j], atol=1e-4)
            np.testing.assert_allclose(
                lsm.gather(-1, torch.tensor(d)[:, None]).squeeze(-1).exp().numpy(), b.target_draft_prob[j], atol=1e-4
            )
            # greedy verification rule on the replayed block
            ok = (torch.tensor(d) == logits.argmax(-1)).long().cumprod(0).bool().numpy()
            np.testing.assert_array_equal(ok, b.accept_mask[j])
            # replay starts where the rollout was rejected: the target's first choice is the committed token
            assert b.target_topk_ids[j, 0, 0] == toks[anchor]
    rb = seqs[0].blocks
    assert (rb.source == 0).all() and (rb.streams == 3).all() and len(rb) > 0
