"""``deo embed``: the command over several scenes (:mod:`~deo_cli.tasks.embed.predict`) and one
scene's dense or pooled embedding (:mod:`~deo_cli.tasks.embed.scene`)."""
