"""``deo segment``: a head trained on a frozen encoder (:mod:`~deo_cli.tasks.segment.train`, with
GEO-Bench segmentation tasks read by :mod:`~deo_cli.tasks.segment.geobench_chips`) and class maps
of scenes (:mod:`~deo_cli.tasks.segment.predict`)."""
