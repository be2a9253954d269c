"""A model named by the user: ``file.py:Name``, ``package.module:Name``, ``timm:<name>``,
``torchvision:<name>`` or a Potion registry name, plus JSON keyword arguments.

A :class:`ModelSpec` is small and picklable: the driver, every sharded importance task and
every Tune trial call the same :meth:`ModelSpec.build`, so they all get the same
architecture. A file spec records the file's sha256 and refuses to build from a file with
other contents: a worker never silently runs a different class than the driver did.

Where a worker finds a user's file (``locate``): the driver's absolute path (a local
cluster), the path as the user wrote it relative to the working directory (``ray job
submit --working-dir .``), or the module shipped to the cluster through Ray's
``runtime_env`` ``py_modules`` (see :meth:`ModelSpec.py_modules`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from potion.errors import PotionError

KINDS = ("file", "module", "timm", "torchvision", "registry")
SPEC_HELP = ("path/to/file.py:Name, package.module:Name, timm:<name>, torchvision:<name> "
             "or a Potion model name")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    target: str  # file path as given, module path, timm/torchvision name, or registry name
    attr: str | None = None  # class or factory name (file/module kinds)
    kwargs: dict[str, Any] = field(default_factory=dict)
    abs_path: str | None = None  # file kind: the driver's absolute path
    sha256: str | None = None  # file kind: sha256 of the file's bytes

    @property
    def text(self) -> str:
        if self.kind in ("file", "module"):
            return f"{self.target}:{self.attr}"
        return self.target if self.kind == "registry" else f"{self.kind}:{self.target}"

    @property
    def module_name(self) -> str:
        """The name the file is imported under everywhere (its stem, as py_modules ships it)."""
        return Path(self.target).stem

    def provenance(self) -> dict:
        out: dict[str, Any] = {"spec": self.text, "kind": self.kind, "kwargs": dict(self.kwargs)}
        if self.kind == "file":
            out.update(path=self.abs_path, sha256=self.sha256)
        return out

    def py_modules(self) -> list[str]:
        """What Ray's runtime_env must ship so that workers without the file can import it."""
        return [self.abs_path] if self.kind == "file" and self.abs_path else []

    def with_kwargs(self, **extra) -> "ModelSpec":
        return ModelSpec(self.kind, self.target, self.attr, {**self.kwargs, **extra}, self.abs_path, self.sha256)

    def build(self) -> nn.Module:
        """A fresh model (random weights) of this spec; the same call on driver and workers."""
        if self.kind == "registry":
            from potion.models import create_model

            return create_model(self.target, **self.kwargs)
        if self.kind == "timm":
            return _build_timm(self.target, self.kwargs)
        if self.kind == "torchvision":
            return _build_torchvision(self.target, self.kwargs)
        module = self.locate() if self.kind == "file" else _import(self.target)
        return _call_factory(getattr_or_fail(module, self.attr, self.text), self.text, self.kwargs)

    def locate(self):
        """The user's file as a module, imported once per process, checked against sha256."""
        name = self.module_name
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) and _same_file(loaded.__file__, self.sha256):
            return loaded
        for candidate in (self.abs_path, self.target):
            if candidate and Path(candidate).is_file():
                if not _same_file(candidate, self.sha256):
                    raise PotionError(
                        f"model file {candidate} differs from the one the run started with (sha256 "
                        f"{self.sha256[:12]}…); every process must see the same {self.target}"
                    )
                if loaded is not None:
                    raise PotionError(
                        f"model file {self.target}: a module named '{name}' ({getattr(loaded, '__file__', '?')}) "
                        "is already imported; rename the file"
                    )
                return _import_file(name, Path(candidate))
        try:  # shipped to this worker through runtime_env py_modules
            module = importlib.import_module(name)
        except ImportError:
            raise PotionError(
                f"model file {self.target} is not on this machine ({self.abs_path}) and was not shipped "
                "with the Ray job; put it in the --working-dir of `ray job submit`"
            ) from None
        if not _same_file(module.__file__, self.sha256):
            raise PotionError(f"module '{name}' on this worker is not the model file {self.target} the run started with")
        return module


def parse_model_spec(text: str, kwargs: dict | None = None) -> ModelSpec:
    """Check ``text`` and resolve what it names (a file must exist; its sha256 is taken)."""
    kwargs = dict(kwargs or {})
    if not isinstance(text, str) or not text.strip():
        raise PotionError(f"--model is empty; give {SPEC_HELP}")
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("timm", "torchvision"):
        if not rest:
            raise PotionError(f"--model {text}: give the {prefix} model name after '{prefix}:'")
        return ModelSpec(prefix, rest, kwargs=kwargs)
    if not sep:
        from potion.models import MODELS

        if text in MODELS:
            return ModelSpec("registry", text, kwargs=kwargs)
        raise PotionError(f"--model {text}: not a Potion model ({', '.join(MODELS.names())}); give {SPEC_HELP}")
    target, attr = text.rsplit(":", 1)
    if not _IDENT.match(attr):
        raise PotionError(f"--model {text}: '{attr}' is not a Python name; give {SPEC_HELP}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise PotionError(f"--model {text}: model file {path} does not exist")
        spec = ModelSpec("file", target, attr, kwargs, str(path.resolve()), file_sha256(path))
        spec.locate()  # fail now on a file that does not import
        return spec
    if not all(_IDENT.match(p) for p in target.split(".")):
        raise PotionError(f"--model {text}: '{target}' is neither a .py file nor a module path; give {SPEC_HELP}")
    return ModelSpec("module", target, attr, kwargs)


def getattr_or_fail(module, attr: str, text: str):
    try:
        return getattr(module, attr)
    except AttributeError:
        names = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and issubclass(v, nn.Module)
                       and getattr(v, "__module__", None) == module.__name__)
        raise PotionError(
            f"--model {text}: {getattr(module, '__file__', module.__name__)} has no '{attr}'"
            + (f" (nn.Module classes there: {', '.join(names)})" if names else "")
        ) from None


def _call_factory(obj, text: str, kwargs: dict) -> nn.Module:
    if not callable(obj):
        raise PotionError(f"--model {text}: '{text.rsplit(':', 1)[1]}' is not a class or a function")
    try:
        model = obj(**kwargs)
    except TypeError as e:
        raise PotionError(f"--model {text}: cannot call it with --model-args {kwargs}: {e}") from None
    except PotionError:
        raise
    except Exception as e:
        raise PotionError(f"--model {text}: building the model failed: {type(e).__name__}: {_first(e)}") from None
    if not isinstance(model, nn.Module):
        raise PotionError(f"--model {text}: it returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _import(target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise PotionError(f"--model: module '{target}' is not installed or not on PYTHONPATH") from None
        raise PotionError(f"--model: importing '{target}' failed: {type(e).__name__}: {_first(e)}") from None
    except Exception as e:
        raise PotionError(f"--model: importing '{target}' failed: {type(e).__name__}: {_first(e)}") from None


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PotionError(f"--model: cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    # Registered under its stem so that pickles of its classes resolve (cloudpickle, torch).
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:  # sibling imports of the user's file (from layers import Block)
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise PotionError(f"--model: importing {path} failed: {type(e).__name__}: {_first(e)}") from None
    return module


def _same_file(path: str | None, sha256: str | None) -> bool:
    return bool(path) and Path(path).is_file() and (sha256 is None or file_sha256(path) == sha256)


def _build_timm(name: str, kwargs: dict) -> nn.Module:
    import timm

    if "pretrained" in kwargs:
        raise PotionError("--model timm:…: 'pretrained' cannot be set; Potion never downloads weights, give --weights")
    if not timm.is_model(name):
        raise PotionError(f"--model timm:{name}: timm has no such model; see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise PotionError(f"--model timm:{name}: timm could not build it with {kwargs}: {_first(e)}") from None


def _build_torchvision(name: str, kwargs: dict) -> nn.Module:
    from torchvision import models as tvm

    if "weights" in kwargs or "pretrained" in kwargs:
        raise PotionError(f"--model torchvision:{name}: weights cannot be set; Potion never downloads, give --weights")
    if name not in tvm.list_models():
        raise PotionError(f"--model torchvision:{name}: torchvision has no such model; see torchvision.models.list_models()")
    try:
        return tvm.get_model(name, weights=None, **kwargs)
    except Exception as e:
        raise PotionError(f"--model torchvision:{name}: could not build it with {kwargs}: {_first(e)}") from None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
