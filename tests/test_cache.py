"""The on-disk importance cache: round trip, keys, and never trusting a damaged entry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from potion.errors import PotionError
from potion.unlearning.cache import ImportanceCache, hash_arrays



def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def imps() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.rand(3, 4, generator=g), "a.bias": torch.rand(3, generator=g), "s": torch.rand((), generator=g)}


def key(cache, m, **kw):
    args = dict(data_hash="d" * 64, estimator="xlf", p=1.0, batch_size=512, extra="")
    args.update(kw)
    return cache.key(m, **args)


def test_round_trip(tmp_path):
    cache = ImportanceCache(tmp_path / "c")
    k = key(cache, model())
    assert cache.get(k) is None
    cache.put(k, imps())
    got = cache.get(k)
    want = imps()
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) and got[n].dtype == torch.float32 for n in want)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"{k}.safetensors"]  # no temp files left


def test_key_depends_on_everything_that_changes_importances(tmp_path):
    cache = ImportanceCache(tmp_path)
    m = model()
    base = key(cache, m)
    assert len(base) == 64 and base == key(cache, m.state_dict()) == key(cache, model())
    variants = [key(cache, m, batch_size=256), key(cache, m, estimator="lf"), key(cache, m, p=2.0),
                key(cache, m, p=None), key(cache, m, data_hash="e" * 64), key(cache, m, extra="augment")]
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-6
    variants.append(key(cache, m))
    m = model()
    with torch.no_grad():
        m[1].running_mean[0] = 0.5  # a buffer changes eval-mode gradients
    variants.append(key(cache, m))
    state = model().state_dict()
    state["0.weight"] = state["0.weight"].double()  # same values, other dtype
    variants.append(key(cache, state))
    assert len(set(variants + [base])) == len(variants) + 1


def _corrupt_and_check(cache, k, damage):
    cache.put(k, imps())
    path = cache.path(k)
    damage(path)
    assert cache.get(k) is None
    assert not path.exists()  # deleted, not trusted next time either


def test_damaged_entries_are_misses_and_deleted(tmp_path):
    cache = ImportanceCache(tmp_path)
    k = key(cache, model())

    def flip_last_byte(path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # inside the tensor data: loads fine, checksum differs
        path.write_bytes(bytes(data))

    _corrupt_and_check(cache, k, flip_last_byte)
    _corrupt_and_check(cache, k, lambda p: p.write_bytes(p.read_bytes()[:-7]))  # truncated
    _corrupt_and_check(cache, k, lambda p: p.write_bytes(b"not a safetensors file"))
    _corrupt_and_check(cache, k, lambda p: p.write_bytes(b""))


def test_entry_under_the_wrong_key_is_a_miss(tmp_path):
    cache = ImportanceCache(tmp_path)
    k1, k2 = key(cache, model()), key(cache, model(), batch_size=1)
    cache.put(k1, imps())
    cache.path(k2).write_bytes(cache.path(k1).read_bytes())
    assert cache.get(k2) is None and not cache.path(k2).exists()
    assert cache.get(k1) is not None


def test_corrupt_entry_is_recomputed(tmp_path):
    cache = ImportanceCache(tmp_path)
    k = key(cache, model())
    calls = []

    def compute():
        calls.append(1)
        return imps()

    first = cache.get_or_compute(k, compute)
    again = cache.get_or_compute(k, compute)
    assert len(calls) == 1 and all(torch.equal(first[n], again[n]) for n in first)
    data = bytearray(cache.path(k).read_bytes())
    data[-2] ^= 0x01
    cache.path(k).write_bytes(bytes(data))
    healed = cache.get_or_compute(k, compute)
    assert len(calls) == 2 and all(torch.equal(healed[n], first[n]) for n in first)
    assert cache.get(k) is not None  # the recomputed entry was stored


def test_bad_key_is_refused(tmp_path):
    with pytest.raises(PotionError, match="sha256"):
        ImportanceCache(tmp_path).get("../../etc/passwd")


def test_hash_arrays():
    a = np.arange(6, dtype=np.int64)
    h = hash_arrays(a, np.array([True, False]))
    assert h == hash_arrays(a.copy(), np.array([True, False]))
    others = [hash_arrays(a), hash_arrays(a.astype(np.int32), np.array([True, False])),
              hash_arrays(a.reshape(2, 3), np.array([True, False])), hash_arrays(a, np.array([False, True])),
              hash_arrays(np.array([True, False]), a), hash_arrays(a[::-1], np.array([True, False]))]
    assert len({h, *others}) == len(others) + 1
    assert hash_arrays(a[::2]) == hash_arrays(np.array([0, 2, 4], dtype=np.int64))  # views hash by value
    assert len(hash_arrays(np.zeros(0))) == 64


def test_entry_rewritten_with_a_matching_checksum_is_not_trusted(tmp_path):
    """A checksum anyone can recompute proves nothing: the entry must carry this user's MAC."""
    from safetensors.torch import save_file

    from potion.unlearning.cache import CACHE_FORMAT, tensors_checksum

    cache = ImportanceCache(tmp_path / "shared", secret=b"mine")
    k = key(cache, model())
    cache.put(k, imps())
    forged = {n: torch.zeros_like(t) for n, t in imps().items()}
    meta = {"format": CACHE_FORMAT, "key": k, "checksum": tensors_checksum(forged), "mac": "0" * 64}
    save_file(forged, str(cache.path(k)), metadata=meta)
    assert cache.get(k) is None and not cache.path(k).exists()
    # another user's entry (another secret) is a miss too, not an error
    ImportanceCache(tmp_path / "shared", secret=b"theirs").put(k, imps())
    assert cache.get(k) is None


def test_default_secret_is_private_and_stable(tmp_path, monkeypatch):
    from potion.unlearning.cache import default_secret

    monkeypatch.setenv("POTION_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("POTION_CACHE_SECRET", raising=False)
    a = default_secret()
    assert a == default_secret() and len(a) == 32
    assert (tmp_path / "c" / "cache-secret").stat().st_mode & 0o777 == 0o600
