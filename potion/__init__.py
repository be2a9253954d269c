"""Potion: heal backdoor-poisoned image classifiers when only part of the poison is known."""

__version__ = "0.1.0"

__all__ = ["heal_model", "Healed"]


def __getattr__(name: str):
    # Lazy: `import potion` stays cheap, and potion.api (torch, the core) loads on first use.
    if name in __all__:
        from potion import api

        return getattr(api, name)
    raise AttributeError(f"module 'potion' has no attribute '{name}'")
