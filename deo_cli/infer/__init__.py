"""The shared streaming core of the inference commands: scenes in, chips through a model, rows out.

Read a scene by band name with its unit and normalisation (``prepare``), plan chips on the
output grid (``tiling``), read and fill them (``chips``), run them through a feature model
(``model``, ``dense`` for heads at stride 1) and stitch blended rows into a sink (``runner``),
across scenes, shards and ranks (``schedule``, ``distributed``); name outputs (``outputs``),
preview them (``preview``, ``mappreview``), store trained heads (``headfile``) and cut labelled
training chips that are read exactly as prediction reads scenes (``trainchips``).

The commands built on it, each with its train and predict, are in :mod:`deo_cli.tasks`.
"""
