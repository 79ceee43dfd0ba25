"""One typed shape for the presets of `dopd-experiments plateau` and `dopd-experiments methods`.

Both experiments are "one shared SFT warm-up, then arms that each take the same learner budget, evaluated on held-out
prompts"; a knob added to one (a gate, more seeds, a stopping rule for sampled evaluation) is a field both see, and an
unknown preset is refused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dopd.common.errors import DopdError


@dataclass(frozen=True)
class Preset:
    overrides: list[str]  # config overrides shared by every run of the experiment
    warmup_steps: int | dict[str, int]  # SFT steps of the shared warm-up (per drafter kind where there are several)
    arm_steps: int  # learner steps per arm after the warm-up (each on micro_batch_size new prompts)
    evals: int  # held-out evaluations per arm (the last at arm_steps)
    seeds: int = 1  # seeds of the arms that get more than one
    gate: float | None = None  # held-out tau the warm-up must reach for the run to be powered (None: no gate)
    drafters: dict[str, list[str]] = field(default_factory=dict)  # per drafter kind: its overrides (K, size)
    se_target: float = 0.03  # sampled (T > 0) evaluation: engine passes with new seeds until SE(tau) <= this ...
    max_passes: int = 1  # ... or this many passes

    def warmup_for(self, kind: str) -> int:
        if isinstance(self.warmup_steps, int):
            return self.warmup_steps
        if kind not in self.warmup_steps:
            raise DopdError(
                f"this preset has no warm-up for drafter kind '{kind}' (it has: {', '.join(self.warmup_steps)})"
            )
        return self.warmup_steps[kind]


def choose(presets: dict[str, Preset], name: str) -> Preset:
    """The named preset, or an error that lists the known ones."""
    if name not in presets:
        raise DopdError(f"unknown preset '{name}' (known: {', '.join(presets)})")
    return presets[name]
