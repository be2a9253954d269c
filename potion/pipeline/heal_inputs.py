"""Deprecated alias (see ``potion.pipeline.MOVED`` for where it went); removed in the next release."""
from potion.pipeline import alias

__getattr__ = alias(__name__)
