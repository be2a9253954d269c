"""A run, described: the typed job configs (``TrainJob``, ``HealJob``), the range checks of
their numbers, and the run folder on disk (``model.pt``, ``poison.parquet``, ``metrics.json``)."""
