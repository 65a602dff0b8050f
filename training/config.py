"""Typed, frozen training configuration, built once from CLI flags (and env) and passed down.

Every run dumps it as ``config.json`` beside its checkpoints and results, and the
model card embeds it, so any published figure can be traced to the exact settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.calibration import StrataTargets
from models.preprocess import INPUT_SIZE
from models.atomic import write_text
from training.errors import RefusedError

DATA_ROOT_ENV = "PNEUMONIA_DATA_ROOT"
WEIGHTS_ENV = "PNEUMONIA_WEIGHTS"
MEDMNIST_SIZES = (28, 64, 128, 224)
MIN_TRAIN_INPUT = 32
"""The smallest input the ResNet-50 keeps a spatial map for (it downsamples 32x)."""


@dataclass(frozen=True)
class AugmentConfig:
    """Batch-wise augmentation applied to the small source tensors before upscaling."""

    rotation_deg: float = 15.0
    hflip_p: float = 0.5
    translate: float = 0.1
    scale_min: float = 0.9
    scale_max: float = 1.1
    shear_deg: float = 5.0
    brightness: float = 0.2
    contrast: float = 0.2
    erase_p: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.2)
    gamma: float = 0.0
    """Shift-robust photometric option: gamma drawn log-uniformly in [1/(1+g), 1+g]; 0 = off."""
    noise_std: float = 0.0
    """Shift-robust option: Gaussian noise of this std (in [0, 1] units) at source size; 0 = off."""
    enabled: bool = True

    def __post_init__(self) -> None:
        """Out-of-range values trained silently (a flip probability of 5 flips every image, an erase range
        given MAX MIN drew nothing sensible), so they are refused before a run writes anything."""
        for name in ("hflip_p", "erase_p", "brightness", "contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RefusedError(f"aug {name} must lie in [0, 1]")
        for name in ("rotation_deg", "translate", "shear_deg", "gamma", "noise_std"):
            if not getattr(self, name) >= 0.0:
                raise RefusedError(f"aug {name} must be 0 (off) or more")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise RefusedError("aug scale_min must be positive and at most scale_max")
        low, high = self.erase_area
        if not 0.0 < low <= high <= 1.0:
            raise RefusedError("aug erase_area MIN MAX must satisfy 0 < MIN <= MAX <= 1")


@dataclass(frozen=True)
class TrainConfig:
    # data
    data_root: Path | None = None
    image_size: int = 28
    subset: int | None = None
    # model
    weights: str = "IMAGENET1K_V2"
    """torchvision's enum name, "none", or a weight file's absolute path (`resolve_weights`)."""
    weights_sha256: str | None = None
    """sha256 of a weight file, taken when the run is configured: the card names the file the run started
    from even when a later stage runs where the path no longer leads to it."""
    resnet_v1_strides: bool = False
    frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
    hidden: int = 512
    dropout: float = 0.5
    init_seed: int | None = None
    """Seed of the new head's random initialisation; None draws it from `seed`. Runs that share one
    start from the same point, which a weight average (`pneumonia-train soup`) needs."""
    # recipe. The defaults are the 1.1.0 release budget (12 x 3072 sampler draws, EMA 0.98, chosen
    # on validation over 6 x 3072: results/ablations/longer_budget), about 24 min on a 2-core CPU
    # with native bf16; the original design's schedule is --epochs 25 --samples-per-epoch 0
    # --ema-decay 0 --class-weights (early stopping still on).
    epochs: int = 12
    samples_per_epoch: int | None = 3072
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    patience: int = 7
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    grad_clip: float = 1.0
    weighted_sampler: bool = True
    class_weighted_loss: bool = False
    """Off since 1.1.0: the sampler already draws the classes 1:1, and weighting the loss again tilted
    the learnt prior ~2.9:1 toward Normal (validation accuracy at 0.5: 89.8% -> 92.9% without it,
    results/ablations/single_balancing)."""
    label_smoothing: float = 0.0
    distill_from: tuple[Path, ...] = ()
    """Finished runs whose best checkpoints teach this one: the student also matches their mean logits
    on every augmented batch (Hinton et al. 2015), so a seed ensemble's gain can ship as one model."""
    distill_weight: float = 0.5
    """Share of the loss given to matching the teachers; the rest is cross-entropy on the labels."""
    distill_temperature: float = 2.0
    ema_decay: float = 0.98
    swa_epochs: int = 0
    """Stochastic weight averaging (Izmailov et al. 2018): the run's model is the uniform mean of the
    (EMA) weights at the end of the schedule's last N epochs, BatchNorm statistics averaged too, instead
    of the one epoch validation picked (kept as best_epoch.pt). 0 = off. EMA averages about one epoch;
    this spans several, like a soup along one trajectory (results/ablations/swa)."""
    low_res_epochs: int = 0
    """Progressive resizing (fast.ai's and FFCV's ResNet-50 recipes): the first N epochs upscale each
    28x28 batch to `low_res_size` instead of the contract's 224 (a step 3.2x cheaper at 128 in a probe
    of the step alone, an epoch about 2.4x in real runs); the later epochs, every validation and the
    exported model use 224, and early stopping waits for the first of them. The source is 28x28, so the
    smaller input loses no detail the image has. 0 = off (results/ablations/progressive_resize)."""
    low_res_size: int = 128
    max_train_minutes: float | None = None
    """Wall-clock budget for fitting (training and validation), like Lightning's `max_time`: the epoch
    running when it is spent stops after its current step, is validated like any other, and fitting
    ends. None = no budget. For CPUs without native bf16, where the default recipe takes hours; the
    recipe itself (and so a reproducible model) is what runs to the end without it."""
    select_metric: str = "auc"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # evaluation / release
    tta_hflip: bool = True
    bootstrap: int = 2000
    strata: StrataTargets = field(default_factory=StrataTargets)
    # runtime
    seed: int = 42
    deterministic: bool = False
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    eval_batch_size: int = 128
    out_dir: Path = Path("runs/default")
    resume: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_size not in MEDMNIST_SIZES:
            raise RefusedError(f"image_size must be one of {MEDMNIST_SIZES}")
        if self.precision not in ("auto", "fp32", "bf16", "amp"):
            raise RefusedError("precision must be auto, fp32, bf16 or amp")
        if self.select_metric not in ("auc", "f1", "loss"):
            raise RefusedError("select_metric must be auc, f1 or loss")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise RefusedError("max_train_minutes must be positive (leave it unset for no budget)")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature <= 0:
            raise RefusedError("distill_weight must lie in [0, 1] and distill_temperature be positive")
        counts = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                  "bootstrap": self.bootstrap, "hidden": self.hidden, "patience": self.patience,
                  "subset": 1 if self.subset is None else self.subset}
        for name, value in counts.items():  # 0 failed deep inside a stage, some after writing files
            if value < 1:
                raise RefusedError(f"{name} must be at least 1")
        if not 0 <= self.swa_epochs <= self.epochs:  # after the counts: --epochs -1 was refused as a bad swa_epochs
            raise RefusedError("swa_epochs must lie in [0, epochs]")
        if not 0 <= self.low_res_epochs < self.epochs:  # the model must end trained at the size it serves
            raise RefusedError("low_res_epochs must lie in [0, epochs): at least the last epoch trains at 224")
        if not MIN_TRAIN_INPUT <= self.low_res_size < INPUT_SIZE:
            raise RefusedError(f"low_res_size must lie in [{MIN_TRAIN_INPUT}, {INPUT_SIZE})")
        if self.low_res_epochs:
            self.check_low_res_schedule()
        if self.samples_per_epoch < 0:
            raise RefusedError("samples_per_epoch must be 0 (one pass over the split) or more")
        self.check_ranges()
        unknown = sorted(set(self.frozen) - set(FREEZABLE))
        if unknown:
            raise RefusedError(f"frozen: no module {', '.join(unknown)} (the ResNet-50's are {', '.join(FREEZABLE)})")

    def check_low_res_schedule(self) -> None:
        """What progressive resizing cannot be combined with: each trained or averaged something other than
        the low-resolution phase's upscaled 28x28 batches at the size the model serves."""
        if self.low_res_size < self.image_size:
            raise RefusedError(f"low_res_size {self.low_res_size} is under image_size {self.image_size}: the batch "
                               "would be shrunk, losing detail the source has, not upscaled less")
        if self.swa_epochs > self.epochs - self.low_res_epochs:
            raise RefusedError("swa_epochs must not reach into the low_res_epochs: the weight average would mix "
                               "weights and BatchNorm statistics trained at the low size")
        if self.distill_from:
            raise RefusedError("distill_from with low_res_epochs: the teachers would score the low-size batches, "
                               "which they were not trained on")

    def train_input_size(self, epoch: int) -> int:
        """The side the 1-based `epoch` upscales its training batches to."""
        return self.low_res_size if epoch <= self.low_res_epochs else INPUT_SIZE

    def check_ranges(self) -> None:
        """Values torch rejects only once training has started (a traceback after config.json was written)
        or that train nonsense silently (negative lr, dropout >= 1 zeroes the head)."""
        if not self.lr > 0 or self.weight_decay < 0:
            raise RefusedError("lr must be positive and weight_decay 0 or more")
        ranges = {"dropout": self.dropout, "ema_decay": self.ema_decay, "label_smoothing": self.label_smoothing}
        for name, value in ranges.items():
            if not 0.0 <= value < 1.0:
                raise RefusedError(f"{name} must lie in [0, 1)")
        if not 0.0 < self.plateau_factor < 1.0:
            raise RefusedError("plateau_factor must lie in (0, 1)")
        others = {"plateau_patience": self.plateau_patience, "grad_clip": self.grad_clip, "threads": self.threads}
        for name, value in others.items():
            if not value >= 0:
                raise RefusedError(f"{name} must be 0 or more")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def dump(self, path: Path) -> None:
        """config.json, replaced whole (`models.atomic`): a kill while writing it left a run no stage could read."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


FREEZABLE = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
"""The backbone's top-level modules that `frozen` may name (the head is always trained)."""
SAME_RUN = ("resnet_v1_strides", "hidden", "dropout", "image_size", "subset")
"""What a checkpoint's network and its images are. Later stages and resumes must repeat them: stride
placement changes no shapes, so best.pt would load strictly into another network (and its ONNX pass
parity against that same wrong network), and another size or subset scores other images."""
STAGE_FIELDS = ("data_root", "tta_hflip", "bootstrap", "strata", "device", "precision", "threads", "eval_batch_size",
                "out_dir", "resume", "progress")
"""What a stage on a finished run takes from its own command: where the data is, the evaluation's choices and
the runtime. Every other field says how the run was trained, so it comes from the run's config.json."""
RESUME_MAY_CHANGE = (*STAGE_FIELDS, "epochs", "max_train_minutes")
"""What a resume may give anew: where the data is, how it runs, and how long the run may go on."""
SAME_RESUME = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in RESUME_MAY_CHANGE)
"""Everything else must be the run's own: the saved optimizer, scheduler and EMA state belong to its recipe
(a different lr was silently overridden by the optimizer's state, a different select_metric compared an AUC
with a saved -loss), and config.json, from which the card is written, must describe what was trained. The
weight average in last.pt covers the last `swa_epochs` epochs, so with it on `epochs` stays too
(train.check_resume)."""


def check_same_run(config: TrainConfig, saved: dict[str, Any], source: Path, fields: tuple[str, ...] = SAME_RUN,
                   consequence: str = "or its checkpoint is read as another network or scored on other images") -> None:
    """Refuse a command whose `fields` differ from a run's saved config (as soup.py refuses its ingredients)."""
    asked = config.to_dict()
    differing = [key for key in fields if key in saved and asked[key] != saved[key]]
    if differing:
        said = ", ".join(f"{key}={saved[key]!r} (this command: {asked[key]!r})" for key in differing)
        raise RefusedError(f"{source} says {said}: pass the run's own flags, {consequence}")


def for_existing_run(config: TrainConfig) -> TrainConfig:
    """The config of a stage (evaluate, export, quantize) on the finished run in `config.out_dir`.

    A separate stage's flags default to the recipe's defaults, not to the run's: the `SAME_RUN` fields
    are checked against its config.json, the training fields (which the card records) are read from it,
    and only `STAGE_FIELDS` stay the command's. A folder without config.json (a copied ONNX model and
    card, to quantize) reads them from the card's `training` instead: the command's defaults had been
    carded as the model's recipe. With neither, the command's config is kept.
    """
    path = config.out_dir / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        check_same_run(config, saved, path)
        return with_trained_fields(config, saved)
    path = config.out_dir / CARD_FILE
    saved = json.loads(path.read_text()).get("training") if path.is_file() else None
    if not isinstance(saved, dict):
        return config
    # an ONNX graph, not a checkpoint: only the images it is scored on must be the command's
    check_same_run(config, saved, path, ("image_size", "subset"), "or it is scored on other images")
    return with_trained_fields(config, saved)


CARD_FILE = "pneumonia_resnet50.card.json"
"""The card `export` writes beside the fp32 model (models.card.card_path_for of pneumonia_resnet50.onnx)."""
MEMBERS_MUST_MATCH = ("image_size", "subset")
"""What the runs combined by `soup` or `ensemble` must share for one card to describe them: the images
they were trained and scored on, and (`same_start_weights`) the start weights the card's `weights_origin` names."""
COMBINING_COMMAND_KEEPS = ("seed",)
"""What a soup or ensemble takes from its own command, beyond `STAGE_FIELDS`: the seed of its bootstrap
CIs and int8 calibration pick (the published soups passed `--seed 0`)."""


def same_start_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs started from the same weights: by sha256 when both recorded one (a file's path
    differs between machines and folders), else by the file's name or the torchvision enum."""
    if a.get("weights_sha256") and b.get("weights_sha256"):
        return a["weights_sha256"] == b["weights_sha256"]
    return Path(str(a.get("weights"))).name == Path(str(b.get("weights"))).name


FIELDS_ADDED_LATER = {"low_res_epochs": 0, "low_res_size": 128}
"""Recipe fields newer than some saved runs, with the value that describes a run saved before them. A
field missing from a config.json was filled from the command (a stage on a 1.1.0 run given
--low-res-epochs would card a schedule that never ran, and a resume would train one)."""


def with_added_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields added since it was written, at the values it was trained with."""
    return {**FIELDS_ADDED_LATER, **saved}


def with_trained_fields(config: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """`config` with every training field (all but `STAGE_FIELDS`) taken from a run's saved config."""
    trained = {f.name for f in dataclasses.fields(TrainConfig)} - set(STAGE_FIELDS)
    return dataclasses.replace(config, **{key: from_json(key, value) for key, value in with_added_fields(saved).items()
                                          if key in trained})


def for_members(config: TrainConfig, run_dirs: list[Path], fields: tuple[str, ...]) -> TrainConfig:
    """The config of a `soup` or `ensemble` of `run_dirs`: the training fields of its first run, as
    `for_existing_run` takes a run's.

    Why: the combining command's own defaults were written into config.json and the card as the model's
    recipe (an ensemble of runs trained from random weights was carded as IMAGENET1K_V2). Runs that
    differ in `MEMBERS_MUST_MATCH` are refused, and so is a command whose `fields` differ from them.
    """
    saved = [member_recipe(run_dir) for run_dir in run_dirs]
    for recipe, run_dir in zip(saved[1:], run_dirs[1:]):
        differing = [key for key in MEMBERS_MUST_MATCH if recipe.get(key) != saved[0].get(key)]
        if not same_start_weights(recipe, saved[0]):
            differing.append("weights")
        if differing:
            said = ", ".join(f"{key}={recipe.get(key)!r} ({run_dirs[0]}: {saved[0].get(key)!r})" for key in differing)
            raise RefusedError(f"{run_dir} says {said}: runs combined into one model must share their images and "
                               "start weights")
    check_same_run(config, saved[0], run_dirs[0] / "config.json", fields)
    combined = with_trained_fields(config, saved[0])
    return dataclasses.replace(combined, **{key: getattr(config, key) for key in COMBINING_COMMAND_KEEPS})


def member_recipe(run_dir: Path) -> dict[str, Any]:
    """A combined run's recipe: its config.json over its card's `training` (a folder whose config.json
    holds only a few fields, as the cost probes' do, is otherwise carded with the command's defaults)."""
    card = run_dir / CARD_FILE
    carded = json.loads(card.read_text()).get("training") if card.is_file() else None
    return {**(carded if isinstance(carded, dict) else {}), **json.loads((run_dir / "config.json").read_text())}


def trained_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config without `STAGE_FIELDS`: the recipe a run was trained with."""
    return {key: value for key, value in saved.items() if key not in STAGE_FIELDS}


def from_json(name: str, value: Any) -> Any:
    """A saved field as the frozen config holds it (JSON gives tuples back as lists, Paths as strings)."""
    if name == "augment":
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    if name == "frozen":
        return tuple(value)
    if name == "distill_from":
        return tuple(Path(p) for p in value)
    return value


def resolve_data_root(flag: str | None) -> Path | None:
    """Flag beats the environment; None lets medmnist use its own default (~/.medmnist)."""
    value = flag or os.environ.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def resolve_weights(flag: str | None) -> str:
    """Flag beats env; default is torchvision's IMAGENET1K_V2 (needs internet or its cache). A weight file
    is given as its absolute path: config.json kept the path as typed, and a stage run from another
    working directory no longer found the file and carded a relative path as a torchvision name."""
    value = flag or os.environ.get(WEIGHTS_ENV) or "IMAGENET1K_V2"
    path = Path(value).expanduser()
    return str(path.resolve()) if path.is_file() else value


def weights_file_sha256(weights: str) -> str | None:
    """sha256 of a weight file (about a second for ResNet-50's); None for "none" and torchvision's names."""
    from models.card import sha256_of

    path = Path(weights)
    return sha256_of(path) if path.is_file() else None


def resolve_frozen(flag: str | None, weights: str) -> tuple[str, ...]:
    """The comma-separated flag as given (an empty string freezes nothing); without it, the default set,
    except for random weights ("none"): frozen random layers would never train, their BatchNorm
    statistics staying at their initial values, so training from scratch trains everything."""
    if flag is not None:
        return tuple(n for n in flag.split(",") if n)
    return () if weights.lower() == "none" else TrainConfig().frozen
