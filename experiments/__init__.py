"""Experiments: users of the dopd package, installed as `dopd.experiments` (their plots need the `experiments`
extra: pip install 'dopd[experiments]'). They drive runs through the public API a user has: `load_config`,
`dopd.train.train` with an `InProcess` backend (or `RayFleet`), `resume_from=` to branch every arm from one warm-up,
`dopd.common.evaluation.heldout` for held-out tau, and the files a run writes (metrics.jsonl, summary.json). The core
keeps nothing that only an experiment needs. Their command line is their own: `dopd-experiments` (console script) or
`python -m dopd.experiments` (experiments/cli.py).

- plateau.py: `dopd-experiments plateau` (SFT vs Draft-OPD vs its ablations from one gated warm-up)
- methods.py: `dopd-experiments methods` (Draft-OPD, Bebop, DVI at one learner budget)
- serve_shift.py: `dopd-experiments serve-shift` (`dopd serve --learn` on traffic the drafter was not trained on:
  held-out tau before / after, the live-tau curve, the lossless check)
- preset.py: the presets' one typed shape; stats.py: standard errors over seeds and paired bootstrap contrasts
"""
