"""`dopd data inspect`: a dataset seen through the target's chat template before any compute is spent on it.

It runs the runners' own data path (`dopd.prompts.run_prompts`) with the run's config, so what it reports is
what `dopd train` would train on: the conversations and turns read, the train / held-out split (by conversation),
every skip and truncation by reason, tokens per turn, and one example exactly as the target sees it (its token
ids decoded, special tokens included) followed by the answer that would be teacher-forced (as_is) or where the
target would start writing (regenerate). Only the tokenizer is loaded, not the model.
"""

from __future__ import annotations

from dopd.common.config import Config
from dopd.conversations import Limits, encode_turns, length_summary


def inspect_data(cfg: Config, tokenizer, show: int = 1) -> dict:
    """The report as a dict (`format_report` prints it)."""
    from dopd.prompts import run_prompts

    d = cfg.data
    p = run_prompts(cfg, tokenizer, need_eval=False)  # inspecting needs no held-out split (training does)
    tr, ev = p.encoded["train"], p.encoded["eval"]
    as_is = d.answers == "as_is"
    limit_answer = d.max_answer_tokens or cfg.rollout.max_new_tokens
    # the given answers' lengths, also in regenerate mode (how long the dataset's answers are, against max_new_tokens)
    given = (
        tr
        if as_is
        else encode_turns(
            tokenizer, tr.prompts, Limits(d.max_prompt_tokens, limit_answer, d.too_long), with_answers=True
        )
    )
    examples = []
    for it in p.train[:show]:
        ex = {"id": it[0], "context": tokenizer.decode(it[1]), "context_tokens": len(it[1])}
        if len(it) == 3:
            ex["answer"] = tokenizer.decode(it[2])
            ex["answer_tokens"] = len(it[2])
        examples.append(ex)
    data = p.split.get("data", {})
    return {
        "source": d.prompts,
        "target": cfg.model.target,
        "answers": d.answers,
        "too_long": d.too_long,
        "counts": {k: v for k, v in data.items() if isinstance(v, int)},
        "train": {
            "examples": len(p.train),
            "sft_examples": len(p.sft),
            "rollout_examples": len(p.rollout),
            **dict(data.get("train", {})),
        },
        "held_out": {
            "groups": len({q.group for q in ev.prompts}),
            "examples": len(p.eval_ids),
            **({"note": p.split["eval_note"]} if "eval_note" in p.split else {}),
            **dict(data.get("eval", {})),
        },
        "split_seed": d.seed,
        "context_tokens": {"limit": d.max_prompt_tokens, **length_summary(tr.prompt_lens)},
        "answer_tokens": {
            "limit": limit_answer,
            "given": length_summary(given.answer_lens),
            "given_counts": dict(given.counts) if not as_is else {},
        },
        "examples": examples,
    }


def _lens(s: dict) -> str:
    if not s.get("n"):
        return "none"
    return f"min {s['min']} / median {s['median']:g} / mean {s['mean']:g} / max {s['max']} (over {s['n']})"


def format_report(r: dict) -> str:
    c = r["counts"]
    rows = ", ".join(f"{k.removeprefix('rows_')} {v}" for k, v in c.items() if k.startswith("rows_") and v)
    skipped = {k.removeprefix("skipped_"): v for k, v in {**c, **r["train"]}.items() if k.startswith("skipped_") and v}
    truncated = {k.removeprefix("truncated_"): v for k, v in r["train"].items() if k.startswith("truncated_") and v}
    held = {k: v for k, v in r["held_out"].items() if k.startswith(("skipped_", "truncated_")) and v}
    out = [
        f"{'source':18s} {r['source']}   (target {r['target']}'s chat template)",
    ]
    if "conversations" in c:
        out.append(f"{'conversations':18s} {c['conversations']}" + (f"  ({rows})" if rows else ""))
        out.append(
            f"{'assistant turns':18s} {c.get('assistant_turns', 0)}   tool messages (context only) {c.get('tool_messages', 0)}   prompts awaiting an answer {c.get('prompts_without_answer', 0)}"
        )
    out.append(f"{'examples':18s} {c.get('examples', 0)}: training {r['train']['examples']} (SFT warm-up {r['train']['sft_examples']}, OPD rollouts {r['train']['rollout_examples']}), "
               f"held-out {r['held_out']['examples']} turns of {r['held_out']['groups']} conversations (split by conversation, seed {r['split_seed']})")  # fmt: skip
    out.append(f"{'skipped':18s} " + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))
    out.append(
        f"{'truncated':18s} "
        + (", ".join(f"{k} {v}" for k, v in truncated.items()) or "none")
        + f"   (data.too_long={r['too_long']})"
    )
    if held:
        out.append(f"{'held-out':18s} " + ", ".join(f"{k} {v}" for k, v in held.items()))
    if "note" in r["held_out"]:
        out.append(f"{'held-out':18s} none: {r['held_out']['note']} (`dopd train` needs one)")
    out.append(
        f"{'context tokens':18s} {_lens(r['context_tokens'])}; limit {r['context_tokens']['limit']} (data.max_prompt_tokens)"
    )
    a = r["answer_tokens"]
    note = (
        "teacher-forced (data.answers=as_is)"
        if r["answers"] == "as_is"
        else f"the dataset's; regenerate: the target writes up to {a['limit']} per turn (rollout.max_new_tokens)"
    )
    out.append(f"{'answer tokens':18s} {_lens(a['given'])}; {note}")
    if a["given_counts"]:
        gc = ", ".join(f"{k} {v}" for k, v in a["given_counts"].items() if v)
        if gc:
            out.append(f"{'  under as_is':18s} {gc}")
    for ex in r["examples"]:
        out.append("")
        out.append(
            f"example {ex['id']}: the context as the target sees it ({ex['context_tokens']} tokens, special tokens shown)"
        )
        out.append("-" * 100)
        out.append(
            ex["context"] + ("" if "answer" in ex else "<the target writes its answer here (data.answers=regenerate)>")
        )
        if "answer" in ex:
            out.append("-" * 40 + f" answer, teacher-forced ({ex['answer_tokens']} tokens) " + "-" * 40)
            out.append(ex["answer"])
        out.append("-" * 100)
    return "\n".join(out)
