"""Training: data readers, the training loop and the command-line entry points.

The layer has three rooms and, at its top, one module per task with its command:

- :mod:`gatezoo.train.core`: the loop and what every command shares. ``config`` (the one config
  schema: YAML files with ``--key value`` overrides), ``loop`` (:func:`~gatezoo.train.core.loop.fit`,
  the one training loop every task drives through a task object), ``checkpoint`` (safetensors
  checkpoints that rebuild their own model, snapshots for ``--resume``, atomic writes), ``optim``
  (AdamW groups and schedules), ``distributed`` (torchrun, DDP, FSDP), ``runs`` (devices, run
  directories, wrapping a model for a distributed run) and ``factory`` (models by name or
  ``NAME:key=value`` spec, peers included).
- :mod:`gatezoo.train.data`: the data readers. ``images`` (Fashion-MNIST from the Debian package,
  idx directories, ``.npz``, image folders, the seeded ``Batches``), ``text`` (parallel text, the
  SentencePiece tokenizer, token-count batches) and ``sword`` (the Bible verse pairs).
- :mod:`gatezoo.train.peers`: the side-by-side peers. ``vision`` (timm) and ``translation``
  (``torch.nn.Transformer``, x-transformers).
- The tasks and commands: ``python -m gatezoo.train.classify`` (train an image classifier),
  ``python -m gatezoo.train.evaluate`` (accuracy of a classification checkpoint),
  ``python -m gatezoo.train.sidebyside`` (several image models on identical batches),
  ``python -m gatezoo.train.translate`` (train a translation model),
  ``python -m gatezoo.train.translate_eval`` (translate or score with a translation run),
  ``python -m gatezoo.train.mt_summary`` and ``python -m gatezoo.train.mt_unseen`` (translation
  runs over seeds, and on an unseen task), ``python -m gatezoo.train.adversarial``
  (adversarial training, AdvMoE) and ``python -m gatezoo.train.selftune`` (Self-Tuning Networks
  and Optuna searches); these two have their own short loops, since each step updates two
  parameter sets in turn.

A new training method goes at the top, as one module with its command that drives
:func:`~gatezoo.train.core.loop.fit`; a new data format goes to ``data``, a new peer to ``peers``.
"""
