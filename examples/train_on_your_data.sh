#!/usr/bin/env bash
# The README's "Train on your data" example, rerunnable: `dopd data inspect` on examples/conversations.jsonl, then
# the same training budget in both answer modes (in one process, SmolLM2-135M-Instruct target), and the held-out
# tau each gives. Writes docs/data/ (inspect.txt, one log per mode, results.md / results.json); runs go to $1.
#   bash examples/train_on_your_data.sh [runs/your-data]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/your-data}
DOPD=${DOPD:-$( [ -x .venv/bin/dopd ] && echo .venv/bin/dopd || echo dopd )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=examples/conversations.jsonl
DOCS=docs/data
# the budget both modes share: 8 held-out conversations, 120 SFT warm-up steps + 24 Draft-OPD steps (the config
# defaults otherwise: EAGLE-3 drafter, K = 4, micro-batch 2, answers of at most 64 tokens, held-out texts of 128)
BUDGET=(data.num_eval=8 sft.warmup_steps=120 learner.steps=24)
mkdir -p "$DOCS" "$OUT"

"$DOPD" data inspect "$DATA" "${BUDGET[@]}" data.answers=as_is --show 1 > "$DOCS/inspect.txt"
for mode in regenerate as_is; do
  start=$SECONDS
  "$DOPD" train --threads 2 --out "$OUT/$mode" data.prompts="$DATA" data.answers="$mode" "${BUDGET[@]}" \
    2>&1 | grep -v -e "WARNING" -e "Writing model shards" > "$DOCS/train_$mode.log"
  echo $((SECONDS - start)) > "$OUT/$mode/wall_s"
done

"$PY" - "$OUT" "$DOCS" "${BUDGET[*]}" <<'PYEOF'
import json, sys
from pathlib import Path

out, docs, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = {}
for mode in ("regenerate", "as_is"):
    evals = [json.loads(l) for l in (out / mode / "metrics.jsonl").read_text().splitlines() if '"event": "eval"' in l]
    warm = [e for e in evals if e["step"] == 120]
    split = json.loads((out / mode / "split.json").read_text())
    rows[mode] = {
        "tau_start": evals[0]["tau"], "tau_after_warmup": warm[0]["tau"] if warm else None, "tau_final": evals[-1]["tau"],
        "alpha_final": evals[-1]["alpha"], "steps_final": evals[-1]["steps"], "learner_steps": evals[-1]["step"],
        "train_examples": split["num_train_encoded"], "held_out_turns": len(split["eval_ids"]),
        "wall_s": int((out / mode / "wall_s").read_text()),
    }
(docs / "results.json").write_text(json.dumps({"budget": budget, "runs": rows}, indent=1) + "\n")
lines = [
    f"Held-out tau on the same budget ({budget}; target smollm2-135m, in-process runner, 2 CPU threads).",
    "Held-out tau: exact simulated greedy tau (K = 4) on the held-out conversations' turns, the target's own answers.",
    "",
    "| data.answers | training examples | held-out turns (verification steps) | tau at start | tau after SFT warm-up (step 120) | final tau (step 144) | wall |",
    "|---|---|---|---|---|---|---|",
]
for mode, r in rows.items():
    lines.append(f"| {mode} | {r['train_examples']} | {r['held_out_turns']} ({r['steps_final']}) | {r['tau_start']:.3f} | {r['tau_after_warmup']:.3f} | **{r['tau_final']:.3f}** | {r['wall_s'] / 60:.1f} min |")
(docs / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
