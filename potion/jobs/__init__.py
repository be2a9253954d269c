"""The commands around a heal: ``potion train``, ``potion evaluate``, ``potion demo`` and
``potion data`` (dataset preparation). Each is one module that the CLI calls."""
