"""Stage 1: fit the network (the torchvision classification reference, trimmed to one loop).

Selection happens on validation only: early stopping and the kept checkpoint use
`config.select_metric` on the validation split. The test split is never touched here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from models.atomic import copy_file, write_text
from training.atomic import save_torch
from training.config import SAME_RESUME, TrainConfig, check_same_run, resolve_weights, with_added_fields
from training.data import Split, augment_batch, ensure_dataset, load_split, to_network_input, to_unit_tensor
from training.engine import predict_logits
from training.errors import InputMissingError, RefusedError
from training.evaluate import load_trained
from models.calibration import binary_metrics
from training.metrics import roc_auc, softmax_pneumonia
from training.model import build_model, check_weights, count_parameters, set_train_mode
from training.runtime import Runtime, restore_rng_states, rng_states, seed_everything

log = logging.getLogger(__name__)
BEST = "best.pt"
"""The run's model: the epoch validation picked or, with `swa_epochs`, the weight average."""
BEST_EPOCH = "best_epoch.pt"
"""With `swa_epochs`, the epoch validation picked, written during fitting; best.pt is decided when fitting ends."""
LAST = "last.pt"
RUN_FILES = (BEST, BEST_EPOCH, LAST, "evaluation.json")
"""What shows that a folder holds a started or finished run, which a fresh (non-resume) run must not mix into."""


@dataclass(frozen=True)
class FitResult:
    best_checkpoint: Path
    best_epoch: int
    history: list[dict]
    seconds: float
    """Wall time of fitting, the parts before a resume included (as `max_train_minutes` counts them)."""
    train_images_per_s: float
    stop_reason: str
    """`epochs` (ran them all), `early_stop` (patience spent) or `time_limit` (`max_train_minutes` spent)."""
    swa: dict | None = None
    """With `swa_epochs`: the epochs averaged into best.pt and the average's validation row; None otherwise
    (or when the run stopped before it had averaged the whole window, and best.pt is the picked epoch)."""
    truncated_epochs: tuple[int, ...] = ()
    """Epochs `max_train_minutes` cut short, those before a resume included: a run stopped by the time limit
    and resumed ends with stop_reason `epochs`, yet one of its epochs trained only part of its draws."""


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1."""
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = counts.sum() / (2.0 * counts)
    return torch.tensor(weights, dtype=torch.float32)


def epoch_indices(labels: np.ndarray, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """WeightedRandomSampler's draw (balanced classes, with replacement) or a plain shuffle: as many
    back-to-back permutations as `samples_per_epoch` needs (one permutation capped it at the split's size)."""
    n = config.samples_per_epoch or len(labels)
    if config.weighted_sampler:
        per_sample = class_weights(labels)[torch.as_tensor(labels)].double()
        return torch.multinomial(per_sample, n, replacement=True, generator=generator)
    passes = -(-n // len(labels))
    return torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(passes)])[:n]


def load_teachers(run_dirs: tuple[Path, ...], runtime: Runtime) -> list[nn.Module]:
    """Frozen, eval-mode networks from finished runs' best checkpoints (architecture from their config.json)."""
    teachers = []
    for run_dir in run_dirs:
        saved = json.loads((run_dir / "config.json").read_text())
        architecture = TrainConfig(hidden=saved["hidden"], dropout=saved["dropout"],
                                   resnet_v1_strides=saved["resnet_v1_strides"])
        teachers.append(load_trained(run_dir / BEST, architecture, runtime).requires_grad_(False))
    return teachers


@torch.no_grad()
def teacher_logits(teachers: list[nn.Module], x: torch.Tensor, runtime: Runtime) -> torch.Tensor | None:
    """Mean logits of the teachers on the student's own augmented batch (a logit ensemble)."""
    if not teachers:
        return None
    with runtime.autocast():
        return torch.stack([teacher(x).float() for teacher in teachers]).mean(0)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
                  loss_weights: torch.Tensor | None, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the labels, mixed with T^2-scaled KL to the teachers' softened distribution."""
    hard = F.cross_entropy(logits, labels, weight=loss_weights, label_smoothing=config.label_smoothing)
    if teacher is None:
        return hard
    t = config.distill_temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                    reduction="batchmean") * t * t
    return (1 - config.distill_weight) * hard + config.distill_weight * soft


def train_one_epoch(model: nn.Module, ema: AveragedModel | None, teachers: list[nn.Module], train: Split,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    loss_weights: torch.Tensor | None, config: TrainConfig, runtime: Runtime,
                    generator: torch.Generator, epoch: int, deadline: float | None = None) -> dict:
    """One pass over the sampler's draws; with a `deadline` (a perf_counter time) it ends after the
    step that reaches it, and the row says so (`time_limit`) when draws were left: an epoch whose last
    step reached the deadline trained all of them and is not cut short (it was recorded as such)."""
    set_train_mode(model, config.frozen)
    order = epoch_indices(train.labels, config, generator)
    size = config.train_input_size(epoch)
    total_loss, correct, seen, start, out_of_time = 0.0, 0, 0, time.perf_counter(), False
    steps = range(0, len(order), config.batch_size)
    bar = tqdm(steps, desc=f"epoch {epoch}", disable=not config.progress, leave=False)
    for begin in bar:
        index = order[begin : begin + config.batch_size].numpy()
        labels = torch.as_tensor(train.labels[index]).to(runtime.device)
        unit = augment_batch(to_unit_tensor(train.images[index]), config.augment, generator)
        x = to_network_input(unit.to(runtime.device), size).contiguous(memory_format=runtime.memory_format)
        with runtime.autocast():
            logits = model(x)
        loss = training_loss(logits.float(), labels, teacher_logits(teachers, x, runtime), loss_weights, config)
        optimizer.zero_grad(set_to_none=True)
        with runtime.backward_precision():
            scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += float(loss.detach()) * len(index)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        if deadline is not None and time.perf_counter() >= deadline:
            out_of_time = begin + config.batch_size < len(order)  # cut short only if it left draws untrained
            break
    bar.close()
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / seen, "train_acc": correct / seen, "train_seconds": seconds,
            "train_img_per_s": seen / seconds, "train_images": seen, "train_input_size": size, "time_limit": out_of_time}


def validate(model: nn.Module, val: Split, loss_weights: torch.Tensor | None, config: TrainConfig,
             runtime: Runtime, epoch: int | str = "the end") -> dict:
    """Validation figures of `model`; non-finite logits (a diverged run) are refused: sklearn failed on them
    with a traceback, and the metrics at 0.5 counted NaN probabilities as Normal."""
    logits = predict_logits(model, val.images, runtime, config.eval_batch_size)
    if not np.isfinite(logits).all():
        raise RefusedError(f"training diverged at epoch {epoch}: its validation logits are not finite (lower --lr)")
    probability = softmax_pneumonia(logits)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.labels)))
    at_half = binary_metrics(val.labels, probability, 0.5)
    return {"val_loss": loss, "val_auc": roc_auc(val.labels, probability), "val_f1": at_half["f1"],
            "val_acc": at_half["accuracy"]}


def selection_score(row: dict, metric: str) -> float:
    return -row["val_loss"] if metric == "loss" else row[f"val_{metric}"]


def build_network(config: TrainConfig) -> nn.Module:
    """The network at its starting point; with `init_seed` the head's draw leaves the run's RNG stream untouched."""
    def build() -> nn.Module:
        return build_model(config.weights, hidden=config.hidden, dropout=config.dropout, frozen=config.frozen,
                           resnet_v1_strides=config.resnet_v1_strides)
    if config.init_seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return build()


def check_resume(config: TrainConfig) -> None:
    """A resumed run continues in its own folder, as the same network on the same images, with the same frozen set.

    Its history, best.pt and config.json lie beside last.pt: anywhere else the run would go on with an
    empty history and no best checkpoint, and evaluation would fail or rank against a record it lacks.
    """
    if config.resume.parent.resolve() != config.out_dir.resolve():
        raise RefusedError(f"resume checkpoint {config.resume} belongs to the run in {config.resume.parent}, but out_dir "
                         f"is {config.out_dir}: resume into the checkpoint's own folder (leave --out-dir out)")
    saved = config.out_dir / "config.json"
    if saved.is_file():
        recorded = with_added_fields(json.loads(saved.read_text()))
        if "weights" in recorded:  # a run from before weight files were recorded by absolute path and sha256
            recorded["weights"] = resolve_weights(recorded["weights"])
        if recorded.get("weights_sha256") is None:
            recorded.pop("weights_sha256", None)
        check_same_run(config, recorded, saved, SAME_RESUME, "as a resume continues the run's own recipe (only "
                       "--epochs, --max-train-minutes and where and how it runs may change)")
        if config.swa_epochs and recorded.get("epochs") != config.epochs:
            raise RefusedError(f"{saved} says epochs={recorded.get('epochs')!r} (this command: {config.epochs}): with "
                             "--swa-epochs the weight average covers the schedule's last epochs, so a resume keeps them")
    trained = check_resume_checkpoint(config.resume)["epoch"]
    if config.epochs < trained:
        raise RefusedError(f"{config.resume} has trained {trained} epochs, more than --epochs {config.epochs}: a resume "
                           "cannot undo them (config.json and the card would describe a schedule that never ran)")


RESUME_KEYS = ("model", "optimizer", "scheduler", "generator", "epoch", "best_score", "best_epoch")


def check_resume_checkpoint(path: Path) -> dict:
    """Refuse what cannot be resumed before anything is written: a mistyped path or best.pt (weights only)
    got as far as loading after config.json had been rewritten with the command's --epochs and --resume,
    and the run's later cards then described a recipe that never ran. Returns the checkpoint."""
    if not path.is_file():
        raise InputMissingError(f"resume checkpoint {path} does not exist (a run writes last.pt in its --out-dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding more than tensors and plain values
        raise RefusedError(f"{path} cannot be read as a checkpoint ({type(exc).__name__})") from exc
    missing = [key for key in RESUME_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise RefusedError(f"{path} is not a resume checkpoint (it has no {', '.join(missing)}): resume from "
                           "last.pt, which a run writes after every epoch")
    return state


def running_mean(average: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor],
                 count: int) -> dict[str, torch.Tensor]:
    """The uniform mean of `count` earlier state dicts (`average`) and `state`: floating tensors are averaged
    (BatchNorm statistics included, as a soup with --keep-averaged-bn does), integer buffers (BN batch counters)
    are the latest. Kept on the CPU as copies: later training steps do not move it, it costs no accelerator
    memory, and the average a resume loads from last.pt (on the CPU) meets the live weights there."""
    if average is None or count == 0:
        return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
    return {key: average[key] + (value.detach().cpu() - average[key]) / (count + 1) if value.is_floating_point()
            else value.detach().to("cpu", copy=True) for key, value in state.items()}


def finish_weight_average(out: Path, released: nn.Module, average: dict[str, torch.Tensor] | None, epochs: list[int],
                          val: Split, loss_weights: torch.Tensor | None, config: TrainConfig,
                          runtime: Runtime) -> dict | None:
    """With `swa_epochs`, write the run's model (best.pt) once fitting has ended; the picked epoch is in best_epoch.pt.

    It is the weight average only when the whole window was averaged. A run that stopped early (patience spent,
    time limit) has a shorter average, down to one unselected epoch that validation had already ranked below
    the picked one, so it keeps the picked epoch. Rewritten from best_epoch.pt and the saved average each time,
    so a resume of a finished run gives the same files. The average is validated like an epoch, and the
    evaluation stage chooses TTA, temperature, threshold and strata for it on validation as usual."""
    if len(epochs) < config.swa_epochs:
        log.warning("the weight average covers epochs %s, not the last %d: best.pt is the picked epoch",
                    epochs or "none", config.swa_epochs)
        copy_file(out / BEST_EPOCH, out / BEST)
        return None
    released.load_state_dict(average)
    row = validate(released, val, loss_weights, config, runtime, f"the weight average of epochs {epochs}")
    save_torch({"model": average, "epoch": epochs[-1], "score": selection_score(row, config.select_metric),
                "swa_epochs": epochs}, out / BEST)
    log.info("weight average of epochs %s -> %s (picked epoch kept as %s)  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()),
             ",".join(map(str, epochs)), BEST, BEST_EPOCH)
    return {"epochs": epochs, **row}


def stop_after(row: dict, epoch: int, best_epoch: int, config: TrainConfig) -> str | None:
    """Why fitting ends after this epoch (`time_limit`, `early_stop`, `epochs`), or None to go on."""
    if row["time_limit"]:
        return "time_limit"
    if epoch - best_epoch >= config.patience and epoch > config.low_res_epochs:  # never before it has trained at 224
        return "early_stop"
    return "epochs" if epoch >= config.epochs else None


def check_fresh_out_dir(config: TrainConfig, overwrite: bool) -> None:
    """A run that is not a resume starts in a folder without another run's checkpoints or evaluation, unless
    `overwrite` says to replace it. Why: a fresh `train` into a finished run's folder rewrote config.json and,
    when it failed before its first epoch, left the old best.pt and evaluation.json, which `export` then
    carded with the failed command's recipe; into an interrupted run's folder it discarded last.pt."""
    held = held_run_files(config.out_dir)
    if held and not overwrite:
        resume = f"continue it with --resume {config.out_dir / LAST}, " if LAST in held else ""
        raise RefusedError(f"--out-dir {config.out_dir} already holds a run ({', '.join(held)}): {resume}replace it "
                           "with --overwrite, or give another --out-dir")


def held_run_files(out: Path) -> list[str]:
    """The `RUN_FILES` in `out`: none unless it holds a started or finished run."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_distinct_runs(run_dirs: list[Path], kind: str) -> None:
    """A soup or ensemble combines each run once. Why: `ensemble run1 run1` (or `run1 run1/`, or a symlink
    to run1) built a graph of one member twice and carded it as two, and `soup` averaged a run with itself."""
    resolved = [run_dir.resolve() for run_dir in run_dirs]
    for index, target in enumerate(resolved):
        if target in resolved[:index]:
            raise RefusedError(f"{run_dirs[index]} is the same run as {run_dirs[resolved.index(target)]}: the {kind} "
                               "would count it twice (list each run once)")


def check_combined_out_dir(out: Path, run_dirs: list[Path], overwrite: bool, kind: str) -> None:
    """Where a soup or ensemble may write: never into one of its own runs, and into a folder holding another
    run only with `overwrite`, as `train`. Why: into a member it replaced that run's model (a soup then
    recorded its own sha256 as the member's), and into another finished run it mixed the two runs' files."""
    target = out.resolve()
    for run_dir in run_dirs:
        if run_dir.resolve() == target:
            raise RefusedError(f"--out-dir {out} is {run_dir}, one of the runs this {kind} combines: give another "
                               "--out-dir (--overwrite does not replace an input)")
    held = held_run_files(out)
    if held and not overwrite:
        raise RefusedError(f"--out-dir {out} already holds a run ({', '.join(held)}): replace it with --overwrite, "
                           "or give another --out-dir")


def start_out_dir(config: TrainConfig, overwrite: bool) -> None:
    """Create the run's folder and write config.json, once every check has passed; with `overwrite` the old
    run's checkpoints go first, so a run that fails early leaves none that config.json does not describe.
    A folder that cannot be made or written (/proc/x, a path under a file, no permission) is refused in one line."""
    out = config.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not config.resume:
            for name in (BEST, BEST_EPOCH, LAST):
                (out / name).unlink(missing_ok=True)
        config.dump(out / "config.json")
    except OSError as exc:
        raise RefusedError(f"--out-dir {out} cannot be written ({type(exc).__name__}: {exc.strerror or exc})") from exc


def fit(config: TrainConfig, runtime: Runtime, overwrite: bool = False) -> FitResult:
    """Train with early stopping; keep the best-on-validation weights in `best.pt`.

    Everything that can be refused (the start weights, loaded strictly into the network; the resume
    checkpoint; the data; the folder) is, before config.json is written. `overwrite` lets a fresh run
    replace a run already in `out_dir` (`check_fresh_out_dir`); a resume, which continues that run, refuses it."""
    out = config.out_dir
    if config.resume and overwrite:  # was silently ignored: the run resumed, though the command asked to replace it
        raise RefusedError(f"--resume {config.resume} continues the run in {config.resume.parent}, --overwrite would "
                           "replace it: give one of them")
    teacher = next((d for d in config.distill_from if d.resolve() == out.resolve()), None)
    if teacher is not None:  # --overwrite removed the teacher's best.pt before it was read: a traceback, a run lost
        raise RefusedError(f"--out-dir {out} is --distill-from {teacher}, a teacher of this run: give another --out-dir")
    check_weights(config.weights)
    if config.resume:
        check_resume(config)
    else:
        check_fresh_out_dir(config, overwrite)
    ensure_dataset(config.data_root, config.image_size)  # a missing or corrupt file refused before config.json is written
    generator = seed_everything(config.seed, config.deterministic)
    train = load_split(config.data_root, "train", config.image_size, config.subset)
    val = load_split(config.data_root, "val", config.image_size, config.subset)
    model = build_network(config)  # loads the start weights strictly: another network's are refused here
    start_out_dir(config, overwrite)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    total, trainable = count_parameters(model)
    log.info("model: %.1fM parameters, %.1fM trainable; runtime %s", total / 1e6, trainable / 1e6, runtime.describe())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True) if config.ema_decay else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    scaler = runtime.grad_scaler()
    teachers = load_teachers(config.distill_from, runtime)
    if teachers:
        log.info("distilling from %d teachers (weight %.2f, T %.1f)", len(teachers), config.distill_weight,
                 config.distill_temperature)
    loss_weights = class_weights(train.labels).to(runtime.device) if config.class_weighted_loss else None
    history, best_score, best_epoch, start_epoch, elapsed_before = [], -np.inf, 0, 1, 0.0
    swa_from = config.epochs - config.swa_epochs + 1 if config.swa_epochs else None
    swa_state, swa_epochs, stopped, truncated = None, [], None, []
    picked = out / (BEST_EPOCH if config.swa_epochs else BEST)
    if config.resume:
        state = torch.load(config.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
        best_score, best_epoch, start_epoch = state["best_score"], state["best_epoch"], state["epoch"] + 1
        elapsed_before = state.get("elapsed_seconds", 0.0)
        swa_state, swa_epochs, stopped = state.get("swa") or None, list(state.get("swa_epochs", [])), state.get("stopped")
        truncated = list(state.get("truncated_epochs", [r["epoch"] for r in history if r.get("time_limit")]))
        if "rng" in state:  # after building the network and the teachers, which drew from the re-seeded generator
            restore_rng_states(state["rng"])
        else:
            log.warning("%s predates saved RNG states: dropout will not draw as in an unbroken run", config.resume)
    started = time.perf_counter()
    # The budget covers the whole run, resumed parts included (Lightning's Timer keeps it in the checkpoint too).
    deadline = started + config.max_train_minutes * 60 - elapsed_before if config.max_train_minutes else None
    stop_reason = "epochs"
    if stopped == "early_stop":  # its patience was spent: an unbroken run would not train on either
        stop_reason, start_epoch = stopped, config.epochs + 1
        log.info("%s had stopped early (patience spent): nothing more to train", config.resume)
    for epoch in range(start_epoch, config.epochs + 1):
        if history and deadline is not None and time.perf_counter() >= deadline:  # never stop before a first epoch
            stop_reason = "time_limit"
            log.info("time limit: %.1f min spent before epoch %d", config.max_train_minutes, epoch)
            break
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row |= train_one_epoch(model, ema, teachers, train, optimizer, scaler, loss_weights, config, runtime, generator,
                               epoch, deadline)
        released = ema.module if ema is not None else model
        row |= validate(released, val, loss_weights, config, runtime, epoch)
        history.append(row)
        score = selection_score(row, config.select_metric)
        scheduler.step(score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            save_torch({"model": released.state_dict(), "epoch": epoch, "score": score}, picked)
        if swa_from is not None and epoch >= swa_from:
            swa_state = running_mean(swa_state, released.state_dict(), len(swa_epochs))
            swa_epochs.append(epoch)
        stopped = stop_after(row, epoch, best_epoch, config)
        if row["time_limit"]:
            truncated.append(epoch)
        save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else {}, "generator": generator.get_state(),
                    "rng": rng_states(runtime.device), "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                    "swa": swa_state or {}, "swa_epochs": swa_epochs, "stopped": stopped, "truncated_epochs": truncated,
                    "elapsed_seconds": elapsed_before + time.perf_counter() - started}, out / LAST)
        write_text(out / "history.json", json.dumps(history, indent=2))
        log.info("epoch %d  " + "  ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"), epoch)
        if stopped == "time_limit":
            stop_reason = stopped
            log.info("time limit: %.1f min spent during epoch %d (%d of its draws trained); it was validated above",
                     config.max_train_minutes, epoch, row["train_images"])
            break
        if stopped == "early_stop":
            stop_reason = stopped
            log.info("early stop: no %s improvement for %d epochs", config.select_metric, config.patience)
            break
    swa = None
    if config.swa_epochs:
        swa = finish_weight_average(out, ema.module if ema is not None else model, swa_state, swa_epochs, val,
                                    loss_weights, config, runtime)
    seconds = elapsed_before + time.perf_counter() - started
    images = sum(r["train_img_per_s"] * r["train_seconds"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    return FitResult(out / BEST, best_epoch, history, seconds, images / train_seconds if train_seconds else 0.0,
                     stop_reason, swa, tuple(truncated))
