"""Typed configs of the command-line jobs (train, heal), loadable from YAML."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from potion.training import TrainRecipe
from potion.unlearning.ptn import PTNConfig


@dataclass
class DataConfig:
    """Which dataset source to load; ``args`` go to its registered factory."""

    dataset: str = "digits"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoisonConfig:
    """SPEC §3: n poisoned samples (a share of |D| or a count), trigger, target class."""

    trigger: str = "badnet"
    share: float | None = 0.02
    count: int | None = None
    target: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "resnet9"
    args: dict[str, Any] = field(default_factory=lambda: {"width": 0.25})
    init: str | None = None  # local weights to fine-tune from (e.g. a ViT's pre-trained file)


@dataclass
class TrainJob:
    """Everything ``potion train`` needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: TrainRecipe = field(default_factory=lambda: TrainRecipe(iterations=500, batch_size=128, lr=0.05))
    device: str = "auto"
    eval_batch_size: int = 512


@dataclass
class HealJob:
    """Everything ``potion heal`` needs besides the run folder and the deletion set."""

    method: str = "xlf_ptn"
    # SPEC §8: a search without a crossing is a reported failure, and so is a deletion set
    # that θ0 already gets wrong (acc0 = 0: no threshold to reach). "keep" reports either in
    # the result and keeps θ0 instead (benchmarks score such a cell as the unchanged model).
    on_no_crossing: Literal["error", "keep"] = "error"
    backend: Literal["local", "ray"] = "local"
    # Gallop then scan upwards (ptn "bracket"): linear's k* unless a_k crosses between gallop
    # points and rises again, in (k* - k*/2 + log k*) evaluations; --strategy linear is the
    # paper's exact scan.
    ptn: PTNConfig = field(default_factory=lambda: PTNConfig(strategy="bracket"))
    importance_batch_size: int = 512
    # Retain importances from a sample of Dr: "auto" (stop once the ratio ranking that PTN
    # reads has settled), a share in (0, 1], or a count; "1.0" is the paper's full pass.
    retain_sample: str | float | int = "auto"
    retain_sample_seed: int | None = None  # None: the job's seed
    # θ0's metrics are read from the run folder's metrics.json; True measures them again.
    remeasure: bool = False
    eval_batch_size: int = 0  # 0: the largest that fits (see potion.metrics.eval_batch_size)
    fast_eval: bool = True  # CUDA only: channels-last + bf16/fp16 autocast for evaluation and the search
    importance_augment: bool = False
    ssd_alpha: float = 10.0
    ssd_lambda: float = 1.0
    val_size: int = 0
    seed: int = 0
    device: str = "auto"
    cache_dir: str | None = None
    # Ray backend
    address: str | None = None
    num_cpus: int | None = None
    gpus_per_trial: float = 0.25
    importance_shards: int = 0
    # MLflow
    tracking_uri: str | None = None
    experiment: str = "potion-heal"
    register_model: str | None = None  # also register the healed model under this name
