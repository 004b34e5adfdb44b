"""Config files of the entry points (`ml_collections`): one tree per run, one preset per file
argument, e.g. `--config=experiments/configs/ftsam.py:cpu`."""
