"""Glue: the jobs users run (train, evaluate, heal, demo, benchmark) on top of the core."""
