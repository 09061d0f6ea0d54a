"""``deo detect-change``: two dates on one grid (:mod:`~deo_cli.tasks.change.pair`), the score
models (:mod:`~deo_cli.tasks.change.model`, :mod:`~deo_cli.tasks.change.cva`) streamed by
:mod:`~deo_cli.tasks.change.score`, the threshold rules (:mod:`~deo_cli.tasks.change.threshold`),
prediction (:mod:`~deo_cli.tasks.change.predict`), training (:mod:`~deo_cli.tasks.change.train`)
and scores against a change label (:mod:`~deo_cli.tasks.change.evaluate`)."""
