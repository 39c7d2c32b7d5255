"""Data pipelines, training loops and command-line entry points.

- :mod:`gatezoo.train.data`: image-classification data in memory (Fashion-MNIST from the Debian
  package, idx directories, ``.npz``, image folders) and the :class:`~gatezoo.train.data.Batches`
  iterator.
- :mod:`gatezoo.train.config`: YAML configs with ``--key value`` overrides.
- :mod:`gatezoo.train.engine`: model building (gatezoo registry or timm peer), AdamW parameter
  groups, warm-up + cosine schedule, the training step, evaluation, safetensors checkpoints that
  rebuild their own model.
- :mod:`gatezoo.train.peers`: the timm peers ``timm_vit_tiny`` and ``timm_mixer_tiny``.
- ``python -m gatezoo.train.classify``: train one model from a config (run directory, resume).
- ``python -m gatezoo.train.evaluate``: test and per-class accuracy of a checkpoint.
- ``python -m gatezoo.train.sidebyside``: several models trained in turns on identical batches.
"""
