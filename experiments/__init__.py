"""Forkable entry points: `python -m experiments.ftsam`, `experiments.distill`, `experiments.bench`."""
