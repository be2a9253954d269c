"""On-disk cache of importances, keyed by what they depend on.

Importances on Dr are the most expensive step of the method (one forward and backward
pass over the training set), and benchmark grids reuse them across deletion sets and
methods. An entry is keyed by a hash of the model's weights, the data, the estimator, p,
and the batch size (I depends on B, SPEC §5). Entries are safetensors files written
atomically with a checksum of their tensor bytes; anything that fails to load or to
match its checksum is deleted and treated as a miss, never trusted.

A checksum only catches damage: anyone who can write the cache folder (a shared one,
say) can write tensors with a matching checksum. So an entry is *trusted* only when it
carries a MAC (HMAC-SHA256) over its key and checksum made with a secret of the user who
computed it: ``$POTION_CACHE_SECRET`` (hex) or the file ``cache-secret`` (mode 0600,
created on first use) in ``$POTION_CACHE`` (default ``~/.cache/potion``), which stays
private even when ``--cache-dir`` points at a shared folder. An entry without a valid
MAC is a miss (recomputed and rewritten), so a tampered or foreign entry is never used.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from potion.errors import PotionError
from potion.io import atomic_write

Tensor = torch.Tensor
log = logging.getLogger(__name__)

# v3: potion_plus (commit 8c39004 to cb3cec6) could store importances taken at NegGrad+'s weights
# under θ0's key; v2 entries are not trusted
CACHE_FORMAT = "potion-importances-v3"
_KEY = re.compile(r"^[0-9a-f]{64}$")
SECRET_ENV = "POTION_CACHE_SECRET"


def default_secret() -> bytes:
    """This user's cache secret (see the module docstring); created on first use."""
    if os.environ.get(SECRET_ENV):
        try:
            return bytes.fromhex(os.environ[SECRET_ENV])
        except ValueError:
            raise PotionError(f"{SECRET_ENV} must be a hex string (e.g. from `openssl rand -hex 32`)") from None
    base = Path(os.environ.get("POTION_CACHE", Path.home() / ".cache" / "potion"))
    path = base / "cache-secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise PotionError(f"importance cache secret {path} is not a hex string; delete it to make a new one") from None
    base.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


def _tensor_bytes(t: Tensor) -> memoryview:
    # A flat uint8 view works for every dtype (bfloat16 has no numpy equivalent).
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _hash_tensors(h: "hashlib._Hash", tensors: Mapping[str, Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))


def tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    _hash_tensors(h, tensors)
    return h.hexdigest()


def _entry_checksum(tensors: Mapping[str, Tensor], info_text: str | None) -> str:
    """The tensors' checksum; an entry with an ``info`` text covers that text too."""
    digest = tensors_checksum(tensors)
    if info_text is None:
        return digest  # the format of entries written before ``info`` existed
    return hashlib.sha256(f"{digest}\0{info_text}".encode()).hexdigest()


def hash_arrays(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes, in order (a data fingerprint)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()


class ImportanceCache:
    def __init__(self, root: str | os.PathLike, secret: bytes | None = None):
        self.root = Path(root)
        self._secret = secret

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = default_secret()
        return self._secret

    def _mac(self, key: str, checksum: str) -> str:
        return hmac.new(self.secret, f"{CACHE_FORMAT}\0{key}\0{checksum}".encode(), hashlib.sha256).hexdigest()

    def key(
        self,
        model_state: Mapping[str, Tensor] | nn.Module,
        data_hash: str,
        estimator: str,
        p: float | None,
        batch_size: int,
        extra: str = "",
    ) -> str:
        """sha256 over the weights (every state entry, sorted by name) and the settings.

        Buffers such as batch-norm running statistics are part of the state: in eval
        mode they change the gradients, so they must change the key.
        """
        state = model_state.state_dict() if isinstance(model_state, nn.Module) else model_state
        h = hashlib.sha256()
        h.update(CACHE_FORMAT.encode() + b"\0")
        _hash_tensors(h, state)
        settings = {
            "data": data_hash,
            "estimator": estimator,
            "p": None if p is None else float(p),
            "batch_size": int(batch_size),
            "extra": extra,
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise PotionError(f"importance cache key must be a sha256 hex digest, got '{key}'")
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, Tensor] | None:
        entry = self.get_entry(key)
        return None if entry is None else entry[0]

    def get_entry(self, key: str) -> tuple[dict[str, Tensor], dict | None] | None:
        """The cached tensors and the ``info`` they were stored with, or None on a miss."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            info_text = meta.get("info")
            info = json.loads(info_text) if info_text is not None else None
            checksum = _entry_checksum(tensors, info_text)
            ok = (
                meta.get("format") == CACHE_FORMAT
                and meta.get("key") == key
                and meta.get("checksum") == checksum
                and hmac.compare_digest(str(meta.get("mac", "")), self._mac(key, checksum))
            )
        except Exception as e:  # any unreadable file is a miss; its cause goes to the log
            log.warning("importance cache entry %s is unreadable (%s); recomputing", path, e)
            ok = False
        if not ok:
            log.warning("importance cache entry %s failed its check; deleting it", path)
            path.unlink(missing_ok=True)
            return None
        return tensors, info

    def get_or_compute(self, key: str, compute: Callable[[], Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The cached entry, or ``compute()`` stored under ``key`` and returned."""
        hit = self.get(key)
        if hit is not None:
            return hit
        value = {n: t.detach().to("cpu") for n, t in compute().items()}
        self.put(key, value)
        return value

    def put(self, key: str, tensors: Mapping[str, Tensor], info: dict | None = None) -> Path:
        """Store ``tensors`` (and a small JSON-able ``info``, e.g. the retain sample) under ``key``."""
        path = self.path(key)
        # Fresh contiguous CPU copies: safetensors refuses views and shared storage.
        data = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
        meta = {"format": CACHE_FORMAT, "key": key}
        info_text = None if info is None else json.dumps(info, sort_keys=True)
        if info_text is not None:
            meta["info"] = info_text
        checksum = _entry_checksum(data, info_text)
        meta["checksum"] = checksum
        meta["mac"] = self._mac(key, checksum)
        return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))
