"""Potion: heal backdoor-poisoned image classifiers when only part of the poison is known."""

__version__ = "0.1.0"
