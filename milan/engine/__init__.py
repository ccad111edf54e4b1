"""Training engine shared by every job.

* :mod:`~milan.engine.config`: typed config dataclasses, YAML presets, dotted overrides, validation, ``derive``.
* :mod:`~milan.engine.optim` / :mod:`~milan.engine.schedule`: weight-decay groups, AdamW, warm-up + cosine.
* :mod:`~milan.engine.loop`: ``train_one_epoch`` (accumulation, autocast, non-finite guard, metric reduction).
* :mod:`~milan.engine.trainer`: ``Trainer`` (resume, epochs, evaluation, epoch records, checkpoints, summary).
* :mod:`~milan.engine.run`: ``start_run`` (process group, runtime, run folder and resume), ``seed_everything``.
* :mod:`~milan.engine.cli`: the jobs' shared command-line arguments and error handling.
* :mod:`~milan.engine.sampling`: resumable per-process sample order and per-sample seeded randomness.
* :mod:`~milan.engine.checkpointing`, :mod:`~milan.engine.logging`: checkpoint files; progress, JSONL, TensorBoard.
* :mod:`~milan.engine.pretrain`: ``milan pretrain``; the evaluation jobs live next to it (their pieces in
  :mod:`milan.eval`).
"""
