"""The Hydra application on top of the library: ``lrl-train``, ``lrl-export`` and ``lrl-collect`` (``cli``), the jobs
they run, the LightningModule, the datamodules and the configs of ``conf/``."""
