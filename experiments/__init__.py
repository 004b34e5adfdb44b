"""Forkable entry points: experiments.ftsam, experiments.distill, experiments.bench."""
