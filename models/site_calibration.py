"""Site calibration: refit temperature, threshold and strata on a hospital's own labelled studies.

Why: the released card's cut-points were chosen on PneumoniaMNIST's validation split,
which comes from the training distribution. They do not transfer to another source:
on the shifted test set, validation asks for a lower threshold than that set can bear
(see results/). Practice in radiology AI is to validate a model locally before go-live
and, where needed, to recalibrate its operating points on local data. This module does
the recalibration with the very functions training uses (`models.calibration`) and
reports an honest estimate of the result:

- ``as_shipped``: the card's own calibration scored on the local cases (nothing fitted);
- ``cross_validated``: stratified k-fold, each fold's cases classified by cut-points
  fitted on the other folds, pooled over folds (nothing scored on what it was fitted on).
  The images of one study share a fold and are resampled together in the bootstrap, and
  the held-out strata are compared with their targets: a miss is a warning in the file.

The saved file is bound to one model by sha256 and carries its provenance (case counts,
a hash of the labels, the targets). Serving applies it over the card
(`PneumoniaDetector(site_calibration=...)`, `TRIAGE_SITE_CALIBRATION`), and each result
records the calibration's sha256. It holds counts only, no paths or patient data.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.atomic import write_text
from models.calibration import (Calibration, StrataTargets, binary_metrics, bootstrap_ci, calibrate, stratum_indices,
                                stratum_report, target_figures)
from models.card import ModelCard, Stratum, nan_for_null, strict_json, validate_calibration
from models.detector import calibrated_probability
from models.errors import ModelIntegrityError, UnreadableImageError

FORMAT = "pneumonia-triage/site-calibration/1"
MIN_CASES_PER_CLASS = 10
"""Below this a k-fold estimate (and any cut-point) is noise: refuse rather than mislead."""
ADVISED_CASES_PER_CLASS = 50
"""A 0.98 sensitivity target is resolved only in steps of 1/n positives; warn below this."""
REPORTED = ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1")
BOOTSTRAP_ROUNDS = 2000
LABEL_WORDS = {"0": 0, "normal": 0, "1": 1, "pneumonia": 1}
SEPARATED = ("the local cases are separated perfectly (every pneumonia scores above every normal): the "
             "temperature cannot be fitted (the likelihood keeps rising as it shrinks, saturating every "
             "probability), so the card's is kept; cut-points fitted on clear-cut cases are optimistic: "
             "add borderline studies")


@dataclass(frozen=True)
class SiteCalibration:
    site: str
    model_sha256: str
    calibration: Calibration
    targets: StrataTargets
    cases: Mapping[str, Any]
    as_shipped: Mapping[str, Any] = field(default_factory=dict)
    cross_validated: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"]["strata"] = [asdict(s) for s in self.calibration.strata]
        return {"format": FORMAT, **data}

    @property
    def sha256(self) -> str:
        """Identity of this calibration: recorded with every result it produced."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Strict JSON (an empty stratum's PPV, NaN, is written null) that every parser reads; `load` reads
        null back as NaN, so the file's sha256 identity is the one computed when it was fitted.

        Written whole to a temporary file beside `path`, then renamed over it: `path` may be the file a
        worker serves, and a worker starting mid-write (or a full disk) must find the old file or the new
        one, never half of one."""
        write_text(path, strict_json(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SiteCalibration":
        """Any unreadable, incomplete or implausible file is a `ModelIntegrityError`: a deployment fault
        the worker retries, never a reason to fail the instances it would have scored."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != FORMAT:
                raise ModelIntegrityError(f"{Path(path).name} is not a site calibration ({FORMAT})")
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelIntegrityError(f"site calibration {Path(path).name} is unreadable or invalid "
                                      f"({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SiteCalibration":
        fit = data["calibration"]
        strata = tuple(sorted((Stratum(**s) for s in fit["strata"]), key=lambda s: s.lower))
        temperature, threshold = float(fit["temperature"]), float(fit["threshold"])
        validate_calibration(temperature, threshold, strata)
        return cls(
            site=data["site"], model_sha256=data["model_sha256"],
            calibration=Calibration(temperature, threshold, strata),
            targets=StrataTargets(**data["targets"]), cases=data["cases"],
            as_shipped=nan_for_null(data.get("as_shipped", {})),
            cross_validated=nan_for_null(data.get("cross_validated", {})),
            warnings=tuple(data.get("warnings", ())), created=data.get("created", ""),
        )

    def apply(self, card: ModelCard) -> ModelCard:
        """The card with this site's temperature, threshold and strata; refuses another model's file."""
        if card.sha256 != self.model_sha256:
            raise ModelIntegrityError(
                f"site calibration {self.site!r} was fitted for model sha256 {self.model_sha256[:12]}..., "
                f"not {card.name} {card.version} ({card.sha256[:12]}...)")
        provenance = {"site": self.site, "sha256": self.sha256, "created": self.created,
                      "cases": dict(self.cases), "warnings": list(self.warnings)}
        return replace(card, temperature=self.calibration.temperature, threshold=self.calibration.threshold,
                       strata=self.calibration.strata, extra={**card.extra, "site_calibration": provenance})


def fit_site_calibration(labels: np.ndarray, logits: np.ndarray, card: ModelCard, site: str,
                         targets: StrataTargets = StrataTargets(), folds: int = 5, seed: int = 0,
                         groups: Sequence[Any] | np.ndarray | None = None) -> SiteCalibration:
    """Fit on all local cases; estimate by stratified k-fold; score the shipped card on the same cases.

    `groups` names each case's study (`case_groups`): a study's images are one unit for the case
    minimum, the folds and the bootstrap. By default every case is a study of its own."""
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    groups = group_codes(groups, len(labels))
    check_cases(labels, folds, groups)
    check_ranking(labels, logits)
    held_out = cross_validate(labels, logits, targets, folds, seed, card.temperature, groups)
    return SiteCalibration(
        site=site,
        model_sha256=card.sha256,
        calibration=fit_calibration(labels, logits, targets, card.temperature),
        targets=targets,
        cases=case_counts(labels, groups),
        as_shipped=score(labels, calibrated_probability(logits, card.temperature), card.threshold, card.strata, groups),
        cross_validated=held_out,
        warnings=(advice(labels, groups) + ((SEPARATED,) if separated(labels, logits) else ())
                  + target_misses(held_out, targets)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def group_codes(groups: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Each case's group as the index of its group's first case (every case its own group by default):
    integers in the cases' order, so one-image groups fold and resample exactly as ungrouped cases."""
    if groups is None:
        return np.arange(n, dtype=np.int64)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} cases")
    first: dict[Any, int] = {}
    return np.array([first.setdefault(group, index) for index, group in enumerate(groups)], dtype=np.int64)


def study_counts(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """Studies (groups), in all and per class: the independent units, however many images each has."""
    pneumonia, normal = (len(np.unique(groups[labels == cls])) for cls in (1, 0))
    return {"n": pneumonia + normal, "pneumonia": pneumonia, "normal": normal}


def case_counts(labels: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Images (n) and studies, per class, and a hash of the labels: counts only, no paths or UIDs."""
    return {"n": int(len(labels)), "pneumonia": int(labels.sum()), "normal": int((1 - labels).sum()),
            "studies": study_counts(labels, groups),
            "labels_sha256": hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest()}


def check_cases(labels: np.ndarray, folds: int, groups: Sequence[Any] | np.ndarray | None = None) -> None:
    """Refuse what no fit can be trusted on, counting studies (`groups`), not images: two images of one
    study are not two independent cases, and the minimum and the folds are about independent cases."""
    labels = np.asarray(labels)
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("labels must be 0 (normal) or 1 (pneumonia)")
    groups = group_codes(groups, len(labels))
    if np.any(labels != labels[groups]):
        raise ValueError("the images of one study carry different labels: a study has one label")
    studies = study_counts(labels, groups)
    smallest = min(studies["pneumonia"], studies["normal"])
    if smallest < MIN_CASES_PER_CLASS:
        grouped = "" if studies["n"] == len(labels) else " studies (the images of one study count once)"
        raise ValueError(f"site calibration needs at least {MIN_CASES_PER_CLASS} pneumonia and "
                         f"{MIN_CASES_PER_CLASS} normal studies; the smaller class has {smallest}{grouped}")
    if not 2 <= folds <= smallest:
        raise ValueError(f"folds must be between 2 and {smallest} (the smaller class), got {folds}")


def margins(logits: np.ndarray) -> np.ndarray:
    """Pneumonia minus normal logit: the order every calibrated probability follows."""
    return logits[:, 1] - logits[:, 0]


def separated(labels: np.ndarray, logits: np.ndarray) -> bool:
    margin = margins(logits)
    return bool(margin[labels == 0].max() < margin[labels == 1].min())


def check_ranking(labels: np.ndarray, logits: np.ndarray) -> None:
    """Refuse cases the model ranks backwards: swapped labels in the CSV, most likely."""
    margin = margins(logits)
    positives, negatives = margin[labels == 1], margin[labels == 0]
    auc = float((positives[:, None] > negatives[None, :]).mean() + 0.5 * (positives[:, None] == negatives[None, :]).mean())
    if auc < 0.5:
        raise ValueError(f"the model ranks these normals above these pneumonias (AUC {auc:.2f}): "
                         "check the CSV's labels (pneumonia = 1) before calibrating")


def fit_calibration(labels: np.ndarray, logits: np.ndarray, targets: StrataTargets,
                    card_temperature: float) -> Calibration:
    """`calibrate`, except on perfectly separated cases, whose NLL has no minimum: the fitted temperature
    would run to the search bound, every probability would saturate to 0 or 1 and the cut-points with
    them. Such cases keep the card's temperature and fit the threshold and cut-points on it."""
    return calibrate(labels, logits, targets, card_temperature if separated(labels, logits) else None)


def advice(labels: np.ndarray, groups: np.ndarray | None = None) -> tuple[str, ...]:
    studies = study_counts(labels, group_codes(groups, len(labels)))
    notes = []
    for name in ("pneumonia", "normal"):
        count = studies[name]
        if count < ADVISED_CASES_PER_CLASS:
            notes.append(f"only {count} {name} studies: cut-points are coarse; "
                         f"{ADVISED_CASES_PER_CLASS} or more of each class are advised")
    return tuple(notes)


def stratified_folds(labels: np.ndarray, folds: int, seed: int,
                     groups: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """Fold index per case, each class's studies (`groups`) spread evenly over the folds in a seeded random
    order, all images of a study in one fold: a study on both sides would be scored on what it was fitted on."""
    groups = group_codes(groups, len(labels))
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        studies, inverse = np.unique(groups[members], return_inverse=True)
        fold_of_study = np.empty(len(studies), dtype=np.int64)
        fold_of_study[np.searchsorted(studies, rng.permutation(studies))] = np.arange(len(studies)) % folds
        assignment[members] = fold_of_study[inverse]
    return assignment


def cross_validate(labels: np.ndarray, logits: np.ndarray, targets: StrataTargets, folds: int,
                   seed: int, card_temperature: float,
                   groups: Sequence[Any] | np.ndarray | None = None) -> dict[str, Any]:
    """Each held-out fold classified by cut-points fitted on the other folds, pooled over folds; a study's
    images stay in one fold and are resampled together for the CIs."""
    groups = group_codes(groups, len(labels))
    assignment = stratified_folds(labels, folds, seed, groups)
    called = np.zeros(len(labels), dtype=bool)
    held_stratum = np.full(len(labels), -1, dtype=np.int64)
    stratum_counts: dict[str, dict[str, int]] = {}
    thresholds = []
    for k in range(folds):
        held_out, fitted_on = assignment == k, assignment != k
        fit = fit_calibration(labels[fitted_on], logits[fitted_on], targets, card_temperature)
        thresholds.append(fit.threshold)
        probability = calibrated_probability(logits[held_out], fit.temperature)
        called[held_out] = probability >= fit.threshold
        held_stratum[held_out] = stratum_indices(probability, fit.strata)
        for name, row in stratum_report(labels[held_out], probability, fit.strata).items():
            pooled = stratum_counts.setdefault(name, {"count": 0, "pneumonia": 0, "normal": 0})
            for key in pooled:
                pooled[key] += row[key]
    top = len(fit.strata) - 1  # high_suspicion's index, as in every fold's strata
    return {"folds": folds, "seed": seed, "fold_thresholds": thresholds,
            **decision_figures(labels, called.astype(float), 0.5, seed, groups=groups),
            **strata_figures(labels, held_stratum, top, seed, groups),
            "strata": with_rates(stratum_counts, labels)}


def score(labels: np.ndarray, probability: np.ndarray, threshold: float,
          strata: tuple[Stratum, ...], groups: np.ndarray | None = None) -> dict[str, Any]:
    """A fixed calibration (nothing fitted) scored on labelled cases."""
    counts = {name: {k: row[k] for k in ("count", "pneumonia", "normal")}
              for name, row in stratum_report(labels, probability, strata).items()}
    return {"threshold": threshold, **decision_figures(labels, probability, threshold, seed=0, groups=groups),
            **strata_figures(labels, stratum_indices(probability, strata), len(strata) - 1, 0, groups),
            "strata": with_rates(counts, labels)}


def decision_figures(labels: np.ndarray, probability: np.ndarray, threshold: float, seed: int,
                     rounds: int = BOOTSTRAP_ROUNDS, groups: np.ndarray | None = None) -> dict[str, dict]:
    """Threshold metrics with 95% bootstrap CIs over cases (over studies, where a study has several images):
    a local test set is small, the CI says how small."""
    def statistic(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        figures = binary_metrics(y, p, threshold)
        return {k: figures[k] for k in REPORTED}

    return {"at_threshold": statistic(labels, probability),
            "at_threshold_ci95": bootstrap_ci(labels, probability, statistic, rounds=rounds, seed=seed, groups=groups)}


def strata_figures(labels: np.ndarray, stratum_index: np.ndarray, top: int, seed: int,
                   groups: np.ndarray | None = None, rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, dict]:
    """The figures the strata targets set (`target_figures`) with 95% bootstrap CIs: the worklist flags
    follow the strata, so whether they keep their targets on unseen cases is the figure that matters."""
    def statistic(y: np.ndarray, index: np.ndarray) -> dict[str, float]:
        return target_figures(y, index, top)

    return {"at_targets": statistic(labels, stratum_index),
            "at_targets_ci95": bootstrap_ci(labels, stratum_index, statistic, rounds=rounds, seed=seed, groups=groups)}


TARGET_MISSES = {
    "rule_out_sensitivity": ("of pneumonia cases stayed out of likely_normal", "rule-out sensitivity",
                             "likely_normal will hold more pneumonia than intended", "--rule-out-sensitivity"),
    "high_suspicion_specificity": ("of normal cases stayed out of high_suspicion", "high-suspicion specificity",
                                   "high_suspicion will flag more normal studies than intended",
                                   "--high-suspicion-specificity"),
}


def target_misses(held_out: Mapping[str, Any], targets: StrataTargets) -> tuple[str, ...]:
    """A held-out strata figure under its target, as a warning kept in the file: the cut-points were fitted
    to meet the target on the fitting cases, and unseen ones (the k-fold estimate) may fall short; the file
    is still written (the CI says how sure the miss is), and `check` repeats the warning where it is deployed."""
    notes = []
    for key, (figure_text, target_text, consequence, flag) in TARGET_MISSES.items():
        figure, target = held_out["at_targets"][key], getattr(targets, key)
        low, high = held_out["at_targets_ci95"][key]
        if figure < target:
            notes.append(f"held out ({held_out['folds']}-fold), {100 * figure:.1f}% {figure_text} (95% CI "
                         f"{100 * low:.1f}-{100 * high:.1f}), under the {target_text} target of {100 * target:.1f}%: "
                         f"{consequence}; a higher {flag} leaves a margin for unseen studies")
    return tuple(notes)


def with_rates(counts: Mapping[str, Mapping[str, int]], labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per stratum: its pneumonia share (PPV of calling it) and its share of all pneumonia / normal cases."""
    positives, negatives = max(int(labels.sum()), 1), max(int((1 - labels).sum()), 1)
    return {name: {**row, "ppv": row["pneumonia"] / row["count"] if row["count"] else float("nan"),
                   "share_of_pneumonia": row["pneumonia"] / positives, "share_of_normal": row["normal"] / negatives}
            for name, row in counts.items()}


def read_cases(csv_path: str | Path) -> tuple[list[Path], np.ndarray, list[int]]:
    """A CSV with columns `path` (DICOM, PNG or JPEG; relative to the CSV) and `label` (normal/pneumonia or 0/1)
    -> paths, labels and each case's line in the file (blank lines counted; a case with a quoted line break
    is named by its last line), by which every later problem is named."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path.name} needs a header with columns 'path' and 'label'")
        paths, labels, lines, first_line = [], [], [], {}
        for row in reader:
            line = reader.line_num  # csv skips blank lines, so counting rows would name the wrong line
            word = (row["label"] or "").strip().lower()
            if word not in LABEL_WORDS:
                raise ValueError(f"{csv_path.name} line {line}: label must be one of {sorted(LABEL_WORDS)}")
            name = (row["path"] or "").strip()
            if not name:
                raise ValueError(f"{csv_path.name} line {line}: no path")
            path = csv_path.parent / name
            key = path.resolve()
            if key in first_line:  # counted twice it would pass the case minimum and sit in two folds
                raise ValueError(f"{csv_path.name} line {line}: the same file as line {first_line[key]}")
            first_line[key] = line
            paths.append(path)
            labels.append(LABEL_WORDS[word])
            lines.append(line)
    return paths, np.asarray(labels, dtype=np.int64), lines


DUPLICATE_KINDS = {"sop": "DICOM instance (SOP Instance UID)", "sha256": "image content (a copy of the file)"}


def case_groups(paths: Sequence[Path], labels: np.ndarray, lines: Sequence[int], headers: Sequence[Any | None],
                source: str) -> np.ndarray:
    """Each case's study as a group code (`group_codes`), refusing a case listed twice under any name.

    A DICOM case is the instance its SOP Instance UID names, in the study its StudyInstanceUID names
    (`headers`: each case's dataset read without pixels, None for a raster or an unread file); a PNG
    or JPEG is its content's SHA-256 and a study of its own. A copy, or one instance exported into
    two folders, would count twice toward the minimum, narrow the CIs and could sit in a fitting and
    a held-out fold at once; a study's images in two folds leak it the same way, so they share one,
    and a study with two labels is refused. Problems are named by CSV line, never by path or UID."""
    seen: dict[tuple[str, str], int] = {}
    study_label: dict[tuple[str, str], tuple[int, int]] = {}
    problems, conflicting, groups = [], set(), []
    for path, label, line, header in zip(paths, labels, lines, headers):
        key, study = case_identity(path, header, line)
        if key in seen:
            problems.append(f"line {line}: the same {DUPLICATE_KINDS[key[0]]} as line {seen[key]}")
        seen.setdefault(key, line)
        first_line, first_label = study_label.setdefault(study, (line, int(label)))
        if first_label != int(label) and study not in conflicting:
            conflicting.add(study)
            problems.append(f"lines {first_line} and {line}: two images of one study (StudyInstanceUID) "
                            "labelled differently")
        groups.append(study)
    if problems:  # all of them at once: a re-export can hold many, and each run reads every file
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{source} " + "; ".join(problems[:10]) + more
                         + ": list each image once; a study has one label")
    return group_codes(groups, len(groups))


def case_identity(path: Path, header: Any | None, line: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """(what makes the case itself, its study): SOP Instance and Study Instance UIDs where the header has
    them, else the file's content, its own study. A file that cannot be read is unique (its line):
    `case_logits` reports it."""
    sop, study = uid_of(header, "SOPInstanceUID"), uid_of(header, "StudyInstanceUID")
    digest = None if sop else content_sha256(path)
    key = ("sop", sop) if sop else ("sha256", digest) if digest else ("unread", str(line))
    return key, (("study", study) if study else key)


def uid_of(header: Any | None, keyword: str) -> str:
    """A UID from a header, "" when there is none or it cannot be read."""
    if header is None:
        return ""
    try:
        return str(header.get(keyword, "") or "").strip()
    except Exception:  # a malformed element (pydicom raises several kinds, RuntimeError too): as if absent
        return ""


def content_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def case_logits(detector: Any, paths: list[Path], batch_size: int = 16,
                lines: list[int] | None = None) -> np.ndarray:
    """Raw logits of every case through the serving path; any unreadable case stops the fit.

    Problems are named by CSV line (`lines`, default: the order of `read_cases`), never by
    path, which may carry patient identifiers.
    """
    if not paths:
        return np.zeros((0, 2))
    lines = lines if lines is not None else [index + 2 for index in range(len(paths))]  # a CSV without blank lines
    unreadable, logits = [], []
    for start in range(0, len(paths), batch_size):
        inputs = []
        for index, path in enumerate(paths[start:start + batch_size], start=start):
            try:  # read and preprocess each case on its own, so a refusal names its line
                inputs.append(detector.network_input(path))  # the detector's checks too (a blank picture)
            except UnreadableImageError as exc:  # its reasons quote no file content or path
                unreadable.append(f"line {lines[index]} ({exc})")
            except OSError as exc:  # its message holds the path
                unreadable.append(f"line {lines[index]} ({type(exc).__name__})")
        if inputs and not unreadable:
            logits.append(detector.logits(np.stack(inputs)))
    if unreadable:
        raise UnreadableImageError(f"{len(unreadable)} case(s) unreadable, fix or remove them: "
                                   + ", ".join(unreadable[:10]))
    return np.concatenate(logits)
