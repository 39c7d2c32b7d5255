"""Data pipelines, the training loop and the command-line entry points.

- :mod:`gatezoo.train.config`: the one config schema (YAML files with ``--key value`` overrides)
  that every command line here reads.
- :mod:`gatezoo.train.data`: image-classification data in memory (Fashion-MNIST from the Debian
  package, idx directories, ``.npz``, image folders) and the :class:`~gatezoo.train.data.Batches`
  iterator.
- :mod:`gatezoo.train.factory`: models by name (gatezoo registry or timm peer, ``NAME:key=value``
  specs); :mod:`gatezoo.train.peers`: the timm peers ``timm_vit_tiny`` and ``timm_mixer_tiny``.
- :mod:`gatezoo.train.optim`: AdamW parameter groups, warm-up + cosine and inverse-square-root
  schedules.
- :mod:`gatezoo.train.checkpoint`: safetensors checkpoints that rebuild their own model and carry
  their task's metadata; atomic writes; the snapshots (with checksum manifests) that ``--resume``
  reads.
- :mod:`gatezoo.train.loop`: :func:`~gatezoo.train.loop.fit`, the one training loop every task
  drives (device, autocast, accumulation, clipping, schedule, progress, metrics, checkpoints).
- ``python -m gatezoo.train.classify``: the image-classification task; train one model from a
  config (run directory, resume).
- ``python -m gatezoo.train.evaluate``: test and per-class accuracy of a checkpoint.
- ``python -m gatezoo.train.sidebyside``: several models trained in turns on identical batches.
"""
