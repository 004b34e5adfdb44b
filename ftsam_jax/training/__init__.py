"""Training in four layers, each built on the one before:

- `step`: one pure update, `step(state, batch, rng) -> (state, metrics)` (`train_step`,
  `sam_step`, `eval_step`, `TrainState`).
- `epoch`: a step over a whole on-device data set, compiled once (`make_epoch_fn`, samplers,
  preprocessing, `make_evaluator`).
- `stage`: epochs with checkpoints, exact resume, progress, logs and interruption info
  (`Stage`, `StageContext`, `train_stage`).
- `recipe`: a classifier's training recipe as one call (`FitConfig`, `fit`: optimiser,
  schedule, SAM, augmentation) used by the backdoored model and the fine-tuning defenses.

The former module names (`ftsam_jax.training.step`, `.loop`, `.runner`, `.fit`) remain as aliases of
these modules.
"""
