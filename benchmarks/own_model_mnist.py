"""A model owner's pieces on real data, made without any of Potion's training code.

Writes, into ``--out``:

- ``mynet.py``: the owner's CNN class (``MyNet``), importable from nowhere else;
- ``data/{train,test}.parquet``: a seeded subset of MNIST (Hugging Face image Parquet), the
  training part poisoned with a trigger Potion has no name for (a 5×5 X in the top-left
  corner) and relabelled to ``--target``;
- ``triggered_test.parquet``: every test image with the trigger and its TRUE label;
- ``mynet_state.pt``: the trained ``state_dict``; ``identified.csv``: a seeded share of the
  poisoned indices (what the owner found).

Then heal it with the command the README shows (``potion heal --model mynet.py:MyNet …``).

    python benchmarks/own_model_mnist.py --data "${POTION_DATA:-data}/mnist" --out own
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from potion.progress import progress_bar  # only for the bar: the model and its training are the owner's own

MODEL_SOURCE = '''\
"""The owner's model: a plain CNN for 28x28 grey digits."""
from torch import nn


class MyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
'''
MEAN, STD = 0.1307, 0.3081


def read(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    table = table.take(pa.array(rows))
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("L"))
                       for r in table.column("image").to_pylist()])[:, None]
    return images, table.column("label").to_numpy().astype(np.int64)


def x_trigger(images: np.ndarray, size: int = 5) -> np.ndarray:
    out = images.copy()
    for i in range(size):
        out[:, 0, 1 + i, 1 + i] = 255
        out[:, 0, 1 + i, size - i] = 255
    return out


def write(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    def png(img):
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        return buf.getvalue()

    col = pa.array([{"bytes": png(im), "path": None} for im in images],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": col, "label": pa.array(labels, pa.int64())})
    pq.write_table(table.replace_schema_metadata({"classes": ",".join(map(str, range(10)))}), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="MNIST in HF Parquet layout (train.parquet, test.parquet)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--poison-share", type=float, default=0.02)
    ap.add_argument("--found-share", type=float, default=0.3, help="share of the poison the owner identified")
    ap.add_argument("--target", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, data = Path(args.out), Path(args.data)
    (out / "data").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"reading {args.n_train} training and {args.n_test} test images from {data}", flush=True)
    x_tr, y_tr = read(data / "train.parquet", args.n_train, args.seed)
    x_te, y_te = read(data / "test.parquet", args.n_test, args.seed)
    rng = np.random.default_rng(args.seed)
    poisoned = np.sort(rng.choice(np.flatnonzero(y_tr != args.target), size=round(args.poison_share * len(y_tr)),
                                  replace=False))
    x_tr[poisoned] = x_trigger(x_tr[poisoned])
    y_tr[poisoned] = args.target
    print(f"poisoned {len(poisoned)} training images (target {args.target}); writing the owner's files to {out}",
          flush=True)
    write(out / "data" / "train.parquet", x_tr, y_tr)
    write(out / "data" / "test.parquet", x_te, y_te)
    write(out / "triggered_test.parquet", x_trigger(x_te), y_te)
    found = np.sort(rng.choice(poisoned, size=max(1, round(args.found_share * len(poisoned))), replace=False))
    (out / "identified.csv").write_text("index\n" + "\n".join(map(str, found)) + "\n")
    (out / "mynet.py").write_text(MODEL_SOURCE)

    namespace: dict = {}
    exec(compile(MODEL_SOURCE, str(out / "mynet.py"), "exec"), namespace)
    torch.manual_seed(args.seed)
    model = namespace["MyNet"](num_classes=10)
    x = (torch.from_numpy(x_tr).float() / 255 - MEAN) / STD
    y = torch.from_numpy(y_tr)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    steps = -(-len(y) // 128)
    with progress_bar(total=args.epochs * steps, desc="training MyNet", unit="batch") as bar:
        for epoch in range(args.epochs):
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed + epoch))
            for i in range(0, len(y), 128):
                idx = perm[i:i + 128]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.set_postfix_str(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}", refresh=False)
                bar.update(1)
    torch.save(model.state_dict(), out / "mynet_state.pt")
    print(f"{len(y_tr)} training images, {len(poisoned)} poisoned (target {args.target}), {len(found)} identified; "
          f"{len(y_te)} test images; trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
