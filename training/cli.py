"""`pneumonia-train`: one subcommand per stage, and `run` for the whole pipeline.

    pneumonia-train run --data-root ../shared/data --weights ../shared/weights/resnet50_imagenet_v1.safetensors
    pneumonia-train train|evaluate|export|quantize --out-dir runs/NAME ...
    pneumonia-train seeds runs/seed-42 runs/seed-7 runs/seed-2026 --out results/seeds
    pneumonia-train card models/pneumonia_resnet50.onnx --metrics results/metrics.json   (re-card a release)
    pneumonia-train polarity --data-root ../shared/data   (the inverted- and turned-image guard's template, models/)
    pneumonia-train soup runs/a runs/b runs/c --out-dir runs/soup ...   (runs trained with one --init-seed)
    pneumonia-train ensemble runs/a runs/b runs/c [--int8] --out-dir runs/ens ...   (exported runs, one ONNX graph)
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from models.card import card_path_for, sha256_of
from models.polarity import POLARITY_FILE
from models.atomic import write_text
from training.config import (SAME_RUN, AugmentConfig, StrataTargets, TrainConfig, for_existing_run, for_members,
                             resolve_data_root, resolve_frozen, resolve_weights, weights_file_sha256)
from training.ensemble import build_ensemble, evaluate_ensemble, write_card
from training.errors import InputMissingError, RefusedError
from training.evaluate import evaluate, evaluation_of, save_evaluation
from training.export import export, refresh_card, release, stride_layout_warning
from training.polarity import build_polarity_template
from training.quantize import quantize
from training.report import write_results
from training.seeds import summarize_seeds
from training.soup import make_soup
from training.runtime import make_runtime
from training.train import BEST, fit

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumonia-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, text in (("run", "train -> evaluate -> export -> card in one go"), ("train", "fit and keep the best checkpoint"),
                       ("evaluate", "honest evaluation of a run's best checkpoint"), ("export", "ONNX + parity + model card"),
                       ("quantize", "optional int8 variant of the exported model, with its own parity and AUC check")):
        add_options(sub.add_parser(name, help=text))
    soup = sub.add_parser("soup", help="average the weights of finished runs that share --init-seed, then evaluate "
                                        "and export the average like `run`")
    soup.add_argument("run_dirs", nargs="+", type=Path, help="out-dirs of finished runs (ingredients)")
    soup.add_argument("--keep-averaged-bn", action="store_true",
                      help="keep the mean of the runs' BatchNorm statistics instead of recomputing them on the train split")
    add_options(soup)
    ensemble = sub.add_parser("ensemble", help="one ONNX graph averaging the logits of finished runs' exported models "
                                               "(int8 members with --int8), evaluated and carded like `run`")
    ensemble.add_argument("run_dirs", nargs="+", type=Path, help="out-dirs of finished, exported runs (members)")
    ensemble.add_argument("--int8", action="store_true", help="quantise each member (static QDQ, as `quantize`)")
    add_options(ensemble)
    card = sub.add_parser("card", help="bring a released model's card up to this version's format from its run's "
                                       "recorded evaluation (results/metrics.json); the model and its figures stay")
    card.add_argument("onnx", type=Path, help="the released ONNX file; its card beside it is rewritten")
    card.add_argument("--metrics", type=Path, required=True, help="that run's metrics.json (results/ of its out-dir)")
    polarity = sub.add_parser("polarity", help="the serving side's inverted- and turned-image guard: its template "
                                               "from the train split, with the figures behind its thresholds "
                                               "(models/polarity.py)")
    polarity.add_argument("--data-root", help="folder holding pneumoniamnist.npz (env PNEUMONIA_DATA_ROOT)")
    polarity.add_argument("--out", type=Path, default=POLARITY_FILE,
                          help="where the template goes (default: the shipped models/polarity_template.json)")
    seeds = sub.add_parser("seeds", help="mean ± sd over finished runs of several seeds, and their ensemble")
    seeds.add_argument("run_dirs", nargs="+", type=Path, help="out-dirs of finished `run`s")
    seeds.add_argument("--out", type=Path, required=True, help="folder for seeds.json, seeds.md and each run's small files")
    seeds.add_argument("--bootstrap", type=int, default=TrainConfig().bootstrap)
    seeds.add_argument("--baseline", type=Path, help="--out of an earlier `seeds` summary to compare validation against")
    seeds.add_argument("--rule-out-sensitivity", type=float, default=StrataTargets().rule_out_sensitivity)
    seeds.add_argument("--high-suspicion-specificity", type=float, default=StrataTargets().high_suspicion_specificity)
    return parser


def add_options(p: argparse.ArgumentParser) -> None:
    d, a = TrainConfig(), AugmentConfig()
    p.add_argument("--data-root", help="folder holding pneumoniamnist.npz (env PNEUMONIA_DATA_ROOT)")
    p.add_argument("--image-size", type=int, default=d.image_size, choices=(28, 64, 128, 224))
    p.add_argument("--subset", type=int, help="stratified subset per split (quick runs, tests)")
    p.add_argument("--weights", help="IMAGENET1K_V2 (default), a .safetensors/.pth path, or none (env PNEUMONIA_WEIGHTS)")
    p.add_argument("--resnet-v1-strides", action="store_true", help="original ResNet v1 stride placement (for v1 weights)")
    p.add_argument("--init-seed", type=int, help="seed of the head's initialisation (default: --seed); runs to be "
                   "averaged by `soup` must share one")
    p.add_argument("--frozen", help=f"comma-separated top-level modules to freeze (default: {','.join(d.frozen)}; "
                   "nothing with --weights none, whose layers are random)")
    p.add_argument("--hidden", type=int, default=d.hidden,
                   help="width of the head's hidden layer (2048 -> HIDDEN -> 2)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head's last layer")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--samples-per-epoch", type=int, default=d.samples_per_epoch,
                   help="sampler draws per epoch; 0 = the train split's size")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping: epochs without a better score")
    p.add_argument("--plateau-factor", type=float, default=d.plateau_factor,
                   help="ReduceLROnPlateau: multiply the LR by this when the score stalls")
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience,
                   help="ReduceLROnPlateau: epochs without a better score before the LR drops")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0 = no clipping)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the cross-entropy (0 = off)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 disables weight EMA")
    p.add_argument("--swa-epochs", type=int, default=d.swa_epochs,
                   help="stochastic weight averaging: the run's model is the mean of the (EMA) weights at the end of "
                        "the last N epochs, BN statistics averaged too; the epoch validation picked is kept as "
                        "best_epoch.pt (0 = off)")
    p.add_argument("--low-res-epochs", type=int, default=d.low_res_epochs,
                   help="progressive resizing: the first N epochs train on batches upscaled to --low-res-size instead "
                        "of 224 (validation, evaluation and export stay at 224; 0 = off)")
    p.add_argument("--low-res-size", type=int, default=d.low_res_size,
                   help="the training input side of the first --low-res-epochs epochs")
    p.add_argument("--max-train-minutes", type=float,
                   help="wall-clock budget for fitting: the running epoch stops after its current step, is validated, "
                        "and training ends (default: none; the recipe runs to its last epoch)")
    p.add_argument("--select-metric", default=d.select_metric, choices=("auc", "f1", "loss"))
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--aug-rotation-deg", type=float, default=a.rotation_deg, help="rotation drawn in [-DEG, DEG]")
    p.add_argument("--aug-hflip-p", type=float, default=a.hflip_p, help="probability of a horizontal flip")
    p.add_argument("--aug-translate", type=float, default=a.translate,
                   help="translation drawn in [-T, T] of the image size, per axis")
    p.add_argument("--aug-scale-min", type=float, default=a.scale_min, help="lower bound of the random zoom")
    p.add_argument("--aug-scale-max", type=float, default=a.scale_max, help="upper bound of the random zoom")
    p.add_argument("--aug-shear-deg", type=float, default=a.shear_deg, help="shear drawn in [-DEG, DEG]")
    p.add_argument("--aug-brightness", type=float, default=a.brightness, help="brightness factor in [1-B, 1+B]")
    p.add_argument("--aug-contrast", type=float, default=a.contrast, help="contrast factor in [1-C, 1+C]")
    p.add_argument("--aug-erase-p", type=float, default=a.erase_p, help="probability of random erasing")
    p.add_argument("--aug-erase-area", type=float, nargs=2, default=a.erase_area, metavar=("MIN", "MAX"),
                   help="share of the image erased, drawn in [MIN, MAX]")
    p.add_argument("--aug-gamma", type=float, default=a.gamma,
                   help="shift-robust gamma range g: gamma in [1/(1+g), 1+g] (0 = off)")
    p.add_argument("--aug-noise", type=float, default=a.noise_std,
                   help="shift-robust Gaussian noise std at source size, in [0, 1] units (0 = off)")
    p.add_argument("--no-weighted-sampler", action="store_true")
    p.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=d.class_weighted_loss,
                   help="also weight the loss by inverse class frequency; with the sampler on, that balances twice "
                        "(the original design's recipe, before 1.1.0)")
    p.add_argument("--distill-from", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                   help="finished runs (out-dirs) whose mean logits teach this run: ships a seed ensemble as one model")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="share of the loss for matching the teachers (the rest is cross-entropy)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument("--no-tta", action="store_true", help="do not consider flip TTA")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--rule-out-sensitivity", type=float, default=StrataTargets().rule_out_sensitivity)
    p.add_argument("--high-suspicion-specificity", type=float, default=StrataTargets().high_suspicion_specificity)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--device", default=d.device)
    p.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16", "amp"))
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out-dir", type=Path, help=f"default: the folder of --resume's checkpoint, else {d.out_dir}")
    p.add_argument("--results-dir", type=Path, help="default: OUT_DIR/results")
    p.add_argument("--resume", type=Path, help="last.pt of an interrupted run")
    p.add_argument("--overwrite", action="store_true",
                   help="run/train/soup/ensemble: start afresh in an --out-dir that already holds a run (its best.pt, "
                        "best_epoch.pt and last.pt are removed first; without it such a folder is refused); not with "
                        "--resume, nor into a run that a soup or ensemble combines")
    p.add_argument("--release-dir", type=Path, help="copy the ONNX model and card here (e.g. models/)")
    p.add_argument("--model-version", default="0.0.0-dev",
                   help="version written into the card (default 0.0.0-dev: a release names its own)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--calibration-images", type=int, default=256, help="quantize: validation images for int8 ranges")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    weights = resolve_weights(args.weights)
    frozen = resolve_frozen(args.frozen, weights)
    if args.frozen is None and frozen != TrainConfig().frozen and args.stage in ("run", "train"):
        log.info("weights %s: nothing frozen (the default %s would keep random layers untrained; pass --frozen to "
                 "freeze anyway)", weights, ",".join(TrainConfig().frozen))
    weights_sha256 = weights_file_sha256(weights) if args.stage in ("run", "train") else None
    if (warning := stride_layout_warning(weights_sha256, args.resnet_v1_strides)) is not None:
        log.warning("%s", warning)
    return TrainConfig(
        data_root=resolve_data_root(args.data_root), image_size=args.image_size, subset=args.subset,
        weights=weights, weights_sha256=weights_sha256,
        resnet_v1_strides=args.resnet_v1_strides, init_seed=args.init_seed,
        frozen=frozen, hidden=args.hidden, dropout=args.dropout, epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, patience=args.patience, plateau_factor=args.plateau_factor,
        plateau_patience=args.plateau_patience, grad_clip=args.grad_clip, label_smoothing=args.label_smoothing,
        ema_decay=args.ema_decay, swa_epochs=args.swa_epochs, max_train_minutes=args.max_train_minutes,
        low_res_epochs=args.low_res_epochs, low_res_size=args.low_res_size,
        select_metric=args.select_metric, augment=augment_from_args(args),
        weighted_sampler=not args.no_weighted_sampler, class_weighted_loss=args.class_weights,
        distill_from=tuple(args.distill_from), distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        tta_hflip=not args.no_tta, bootstrap=args.bootstrap,
        strata=strata_targets(args), seed=args.seed,
        deterministic=args.deterministic, device=args.device, precision=args.precision, threads=args.threads,
        out_dir=out_dir_from_args(args), resume=args.resume, progress=not args.no_progress,
    )


def augment_from_args(args: argparse.Namespace) -> AugmentConfig:
    return AugmentConfig(
        rotation_deg=args.aug_rotation_deg, hflip_p=args.aug_hflip_p, translate=args.aug_translate,
        scale_min=args.aug_scale_min, scale_max=args.aug_scale_max, shear_deg=args.aug_shear_deg,
        brightness=args.aug_brightness, contrast=args.aug_contrast, erase_p=args.aug_erase_p,
        erase_area=tuple(args.aug_erase_area), gamma=args.aug_gamma, noise_std=args.aug_noise,
        enabled=not args.no_augment,
    )


def out_dir_from_args(args: argparse.Namespace) -> Path:
    """`--resume runs/X/last.pt` alone continues in runs/X, where the run's history and best.pt are."""
    if args.out_dir is not None:
        return args.out_dir
    return args.resume.parent if args.resume is not None else TrainConfig().out_dir


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return run_stage(args, argv)
    except (RefusedError, InputMissingError) as exc:  # what to fix is in the message; a defect keeps its traceback
        print(f"pneumonia-train {args.stage}: {exc}", file=sys.stderr)
        return 2


def strata_targets(args: argparse.Namespace) -> StrataTargets:
    try:
        return StrataTargets(args.rule_out_sensitivity, args.high_suspicion_specificity)
    except ValueError as exc:  # 98 for 0.98: its message says so
        raise RefusedError(str(exc)) from exc


def check_run_dirs(args: argparse.Namespace) -> None:
    """The runs a summary, soup, ensemble or distillation reads must be run folders (a typo was a
    FileNotFoundError, for --distill-from after config.json was written)."""
    for run_dir in getattr(args, "run_dirs", None) or ():
        if not (run_dir / "config.json").is_file():
            raise InputMissingError(f"{run_dir} is not a run folder (no config.json): give the --out-dir of a finished run")
    for run_dir in getattr(args, "distill_from", None) or ():
        missing = [name for name in ("config.json", BEST) if not (run_dir / name).is_file()]
        if missing:
            raise InputMissingError(f"--distill-from {run_dir} holds no {', '.join(missing)}: give the --out-dir of a "
                                    "finished run")


COMBINED_MUST_REPEAT = {"soup": SAME_RUN, "ensemble": ("image_size", "subset")}
"""What a soup's or ensemble's command must repeat of its runs: a soup is scored as one network of theirs,
an ensemble graph only on their images (each member keeps its own network)."""


def refresh_release_card(onnx: Path, metrics_path: Path) -> None:
    """`card`: refuse a missing card or a file that is not a run's metrics.json in one line (each was a traceback)."""
    if not metrics_path.is_file():
        raise InputMissingError(f"no metrics file {metrics_path} (a run writes results/metrics.json)")
    if not card_path_for(onnx).is_file() or not onnx.is_file():
        raise InputMissingError(f"no model {onnx} with its card {card_path_for(onnx).name} beside it")
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as exc:
        raise RefusedError(f"{metrics_path} is not JSON ({exc})") from exc
    try:
        card = refresh_card(onnx, metrics, str(metrics_path))
    except (KeyError, TypeError, IndexError) as exc:
        raise RefusedError(f"{metrics_path} is not a run's metrics.json (it has no {exc})") from exc
    card.save(card_path_for(onnx))


def run_stage(args: argparse.Namespace, argv: list[str]) -> int:
    """The stage `args.stage`, as parsed by `build_parser`."""
    check_run_dirs(args)
    if args.stage == "seeds":
        if args.bootstrap < 1:
            raise RefusedError("bootstrap must be at least 1")
        targets = strata_targets(args)
        figures = summarize_seeds(args.run_dirs, args.out, targets, args.bootstrap, args.baseline)
        log.info("%d seeds: test AUC %.4f ± %.4f -> %s", len(args.run_dirs),
                 figures["mean_sd"]["at_0.5"]["auc"]["mean"], figures["mean_sd"]["at_0.5"]["auc"]["sd"], args.out)
        return 0
    if args.stage == "polarity":
        made = build_polarity_template(resolve_data_root(args.data_root), args.out)
        held_out = made.provenance["figures"]["val_and_test"]["by_perturbation"]
        log.info("polarity template -> %s; validation and test refused %d as stored, caught %d of %d inverted",
                 args.out, held_out["as_stored"]["refused_correct"], held_out["as_stored"]["caught_inverted"],
                 made.provenance["figures"]["val_and_test"]["images"])
        return 0
    if args.stage == "card":
        refresh_release_card(args.onnx, args.metrics)
        log.info("card of %s refreshed from %s", args.onnx, args.metrics)
        return 0
    config = config_from_args(args)
    if args.stage in ("evaluate", "export", "quantize"):
        config = for_existing_run(config)
    if args.stage in COMBINED_MUST_REPEAT:
        config = for_members(config, args.run_dirs, COMBINED_MUST_REPEAT[args.stage])
    needs = {"evaluate": (BEST, "run_info.json", "history.json"), "export": (BEST, "evaluation.json", "run_info.json"),
             "quantize": ("pneumonia_resnet50.onnx",)}.get(args.stage, ())
    missing = [name for name in needs if not (config.out_dir / name).is_file()]
    if missing:
        raise InputMissingError(f"{config.out_dir} holds no {', '.join(missing)}: give the --out-dir of a run that got "
                                "that far (`pneumonia-train run` writes them all)")
    runtime = make_runtime(config.device, config.precision, config.threads)
    run_info_path = config.out_dir / "run_info.json"
    if args.stage in ("run", "train"):
        result = fit(config, runtime, overwrite=args.overwrite)
        run_info = {"command": "pneumonia-train " + shlex.join(argv), "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history), "stop_reason": result.stop_reason, "train_seconds": result.seconds,
                    "train_img_per_s": result.train_images_per_s, "runtime": runtime.describe(),
                    "select_metric": config.select_metric,
                    "teachers": {str(d): sha256_of(d / BEST) for d in config.distill_from}, "swa": result.swa,
                    "truncated_epochs": list(result.truncated_epochs)}
        write_text(run_info_path, json.dumps(run_info, indent=2) + "\n")
        log.info("trained %d epochs in %.1f min (%.1f img/s), stopped by %s; best epoch %d%s%s", len(result.history),
                 result.seconds / 60, result.train_images_per_s, result.stop_reason, result.best_epoch,
                 f"; the model is the weight average of epochs {result.swa['epochs']}" if result.swa else "",
                 f"; epochs {result.truncated_epochs} were cut short by --max-train-minutes" if result.truncated_epochs else "")
    if args.stage == "soup":
        run_info = {"command": "pneumonia-train " + shlex.join(argv),
                    **make_soup(args.run_dirs, config, runtime, recompute_bn=not args.keep_averaged_bn,
                                overwrite=args.overwrite)}
        write_text(run_info_path, json.dumps(run_info, indent=2) + "\n")
    if args.stage == "ensemble":
        return ship_ensemble(args, config, argv)
    if args.stage in ("run", "evaluate", "soup"):
        started = time.perf_counter()
        evaluation = evaluate(config.out_dir / BEST, config, runtime)
        save_evaluation(evaluation, config.out_dir / "evaluation.json", config, sha256_of(config.out_dir / BEST))
        run_info = json.loads(run_info_path.read_text())
        run_info["evaluate_seconds"] = time.perf_counter() - started
        write_text(run_info_path, json.dumps(run_info, indent=2) + "\n")
        history = json.loads((config.out_dir / "history.json").read_text())
        write_results(args.results_dir or config.out_dir / "results", evaluation, history, run_info, config.out_dir)
        log.info("test AUC %.4f, accuracy %.4f (threshold 0.5)", evaluation.metrics["test"]["at_0.5"]["point"]["auc"],
                 evaluation.metrics["test"]["at_0.5"]["point"]["accuracy"])
    if args.stage in ("run", "export", "soup"):
        evaluation, config = evaluation_of(config.out_dir / "evaluation.json", config.out_dir / BEST, config)
        run_info = json.loads(run_info_path.read_text())
        onnx_path = export(config.out_dir / BEST, config, evaluation, runtime, args.model_version, run_info)
        if args.release_dir:
            log.info("released %s", release(onnx_path, args.release_dir))
    if args.stage == "quantize":
        int8_path = quantize(config.out_dir / "pneumonia_resnet50.onnx", config, args.calibration_images)
        if args.release_dir:
            log.info("released %s", release(int8_path, args.release_dir))
    return 0


def ship_ensemble(args: argparse.Namespace, config: TrainConfig, argv: list[str]) -> int:
    """Build, evaluate (validation chooses, test once), card and optionally release an ensemble graph."""
    run_info = {"command": "pneumonia-train " + shlex.join(argv),
                **build_ensemble(args.run_dirs, config, args.int8, args.calibration_images, args.overwrite)}
    started = time.perf_counter()
    evaluation, parity = evaluate_ensemble(args.run_dirs, config, args.int8)
    save_evaluation(evaluation, config.out_dir / "evaluation.json", config)
    run_info["evaluate_seconds"] = time.perf_counter() - started
    write_text(config.out_dir / "run_info.json", json.dumps(run_info, indent=2) + "\n")
    write_results(args.results_dir or config.out_dir / "results", evaluation, [], run_info, config.out_dir)
    onnx_path = write_card(config, evaluation, parity, args.model_version, run_info)
    log.info("ensemble: test AUC %.4f, accuracy %.4f (threshold 0.5); parity against the members' mean %.2e",
             evaluation.metrics["test"]["at_0.5"]["point"]["auc"], evaluation.metrics["test"]["at_0.5"]["point"]["accuracy"],
             parity["max_abs_delta_probability"])
    if args.release_dir:
        log.info("released %s", release(onnx_path, args.release_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
