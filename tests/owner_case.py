"""A model owner's case, built the way a user would have it, with no Potion in it:

- ``mynet_owner.py``: their own model class, in their own folder (not importable);
- ``data/{train,test}.parquet``: sklearn's digits (16×16), the training set poisoned with a
  trigger Potion has no name for (an X in the top-left corner) relabelled to class 7;
- ``triggered_test.parquet``: every test image with the trigger and its true label;
- ``weights.pt`` (bare state dict), ``weights_ddp.pt`` (``module.`` prefix),
  ``weights.safetensors``; ``identified.csv``: 30 % of the poisoned indices.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

MODEL_SOURCE = '''\
import torch
from torch import nn


class MyNet(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def make_thing():
    return 3
'''
MEAN, STD, TARGET = 0.3, 0.4, 7


def x_trigger(images: np.ndarray) -> np.ndarray:
    """A 4×4 X of white pixels in the top-left corner."""
    out = images.copy()
    for i in range(4):
        out[:, 0, i, i] = 255
        out[:, 0, i, 3 - i] = 255
    return out


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    table = pa.table({"image": pa.array([{"bytes": _png(im), "path": None} for im in images],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels, pa.int64())})
    pq.write_table(table.replace_schema_metadata({"classes": ",".join(map(str, range(10)))}), path)


def load_model_class(folder: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_owner_direct", folder / "mynet_owner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MyNet


def build(folder: Path, poison_share: float = 0.06, iterations: int = 300, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mynet_owner.py").write_text(MODEL_SOURCE)
    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None].repeat(2, 2).repeat(2, 3)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    tr, te = order[:1400], order[1400:]
    x_tr, y_tr, x_te, y_te = images[tr], labels[tr].copy(), images[te], labels[te]
    candidates = np.flatnonzero(y_tr != TARGET)
    poisoned = np.sort(rng.choice(candidates, size=int(poison_share * len(y_tr)), replace=False))
    x_tr[poisoned] = x_trigger(x_tr[poisoned])
    y_tr[poisoned] = TARGET
    (folder / "data").mkdir(exist_ok=True)
    write_parquet(folder / "data" / "train.parquet", x_tr, y_tr)
    write_parquet(folder / "data" / "test.parquet", x_te, y_te)
    write_parquet(folder / "triggered_test.parquet", x_trigger(x_te), y_te)
    found = np.sort(rng.choice(poisoned, size=max(1, round(0.3 * len(poisoned))), replace=False))
    (folder / "identified.csv").write_text("index\n" + "\n".join(map(str, found)) + "\n")

    torch.manual_seed(seed)
    model = load_model_class(folder)(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = (torch.from_numpy(x_tr).float() / 255 - MEAN) / STD
    y = torch.from_numpy(y_tr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(iterations):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "weights.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "weights_ddp.pt")
    from safetensors.torch import save_file

    save_file(state, str(folder / "weights.safetensors"))
    return {"folder": folder, "poisoned": poisoned, "found": found, "state": state}


def heal_args(folder: Path, weights: str = "weights.pt") -> list[str]:
    """The flags of `potion heal` for this case, relative to ``folder``."""
    return ["--model", "mynet_owner.py:MyNet", "--model-args", '{"num_classes": 10}', "--weights", weights,
            "--dataset", "parquet", "--data-root", "data", "--mean", str(MEAN), "--std", str(STD),
            "--identified", "identified.csv", "--triggered-test", "triggered_test.parquet", "--target", str(TARGET)]


def _decode(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    t = pq.read_table(path)
    imgs = [np.asarray(Image.open(io.BytesIO(r["bytes"]))) for r in t.column("image").to_pylist()]
    x = torch.from_numpy(np.stack(imgs)[:, None]).float().div(255).sub(MEAN).div(STD)
    return x, t.column("label").to_numpy()


def direct_k_star(case: dict, step: float = 2.0, batch_size: int = 512) -> int:
    """k* from the core functions alone: the owner's class, the data decoded here with PIL."""
    from potion.unlearning.methods import HealContext, heal
    from potion.unlearning.ptn import PTNConfig

    folder = case["folder"]
    model = load_model_class(folder)(num_classes=10)
    model.load_state_dict(case["state"])
    x, y = _decode(folder / "data" / "train.parquet")
    found = case["found"]
    retain = np.setdiff1d(np.arange(len(y)), found)

    def chunks(idx):
        return [(x[idx[i:i + batch_size]], torch.from_numpy(y[idx[i:i + batch_size]]))
                for i in range(0, len(idx), batch_size)]

    # The heal's defaults: its retain sample (drawn from the positions of Dr) and its search.
    from potion.runs.configs import HealJob
    from potion.unlearning.sampling import parse_retain_sample

    job = HealJob()
    ctx = HealContext(model=model, state0=model.state_dict(), retain_batches=lambda: chunks(retain),
                      forget_batches=chunks(found), n_forget=len(found), n_total=len(y),
                      ptn=PTNConfig(step=step, strategy=job.ptn.strategy),
                      retain_sample=parse_retain_sample(job.retain_sample, job.seed),
                      retain_batches_at=lambda pos: chunks(retain[pos]), n_retain=len(retain),
                      retain_batch_size=batch_size)
    return heal("xlf_ptn", ctx).info["k_star"]
