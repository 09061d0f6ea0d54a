"""One package per task, each with its train and predict, over the streaming core
:mod:`deo_cli.infer`.

- :mod:`deo_cli.tasks.embed`: ``deo embed`` (embeddings of scenes of any size);
- :mod:`deo_cli.tasks.segment`: ``deo segment train`` and ``deo segment predict``;
- :mod:`deo_cli.tasks.change`: ``deo detect-change`` and ``deo detect-change train``, with the
  threshold rules, the CVA baseline and the evaluation against a change label.

The packages are named after the tasks, not the commands' Python API functions
(``deo_cli.embed``, ``deo_cli.segment``, ``deo_cli.detect_change``, :mod:`deo_cli.api`), which a
submodule of the same name would shadow.
"""
