"""`python -m dopd.experiments`: the experiments' command line (experiments/cli.py)."""

from dopd.experiments.cli import main

main()
