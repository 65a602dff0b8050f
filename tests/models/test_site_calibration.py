"""Site calibration: fitting, the honest k-fold estimate, binding to one model, and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from models.calibration import StrataTargets, binary_metrics, calibrate
from models.card import default_model_path
from models.detector import PneumoniaDetector, calibrated_probability, load_card
from models.errors import ModelIntegrityError, UnreadableImageError
from models.site_calibration import (SiteCalibration, case_logits, check_cases, cross_validate,
                                     fit_site_calibration, read_cases, stratified_folds)
from worker.samples import write_labelled_cases


@pytest.fixture(scope="module")
def test_split(pneumoniamnist) -> tuple[np.ndarray, np.ndarray]:
    return pneumoniamnist["test_images"], pneumoniamnist["test_labels"].reshape(-1).astype(np.int64)


@pytest.fixture(scope="module")
def card():
    return load_card(default_model_path())


def shifted_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose classes separate around a pneumonia logit margin of +1.5, not 0 (a site shift)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(np.int64)
    margin = np.where(labels == 1, 3.0, 0.0) + rng.normal(0, 1.0, n)
    return labels, np.stack([np.zeros(n), margin], axis=1)


def test_folds_spread_each_class_evenly():
    labels = np.array([1] * 7 + [0] * 5)
    folds = stratified_folds(labels, 3, seed=1)
    for cls, count in ((1, 7), (0, 5)):
        per_fold = np.bincount(folds[labels == cls], minlength=3)
        assert per_fold.sum() == count and per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(folds, stratified_folds(labels, 3, seed=1))


def test_cross_validation_is_not_the_in_sample_fit():
    """On pure noise an in-sample Youden cut looks better than chance; held-out folds must not."""
    rng = np.random.default_rng(0)
    labels = np.array([1] * 200 + [0] * 200)
    logits = np.stack([np.zeros(400), rng.normal(0, 1, 400)], axis=1)
    fit = calibrate(labels, logits, StrataTargets())
    in_sample = binary_metrics(labels, calibrated_probability(logits, fit.temperature), fit.threshold)
    held_out = cross_validate(labels, logits, StrataTargets(), folds=5, seed=0, card_temperature=1.0)["at_threshold"]
    assert in_sample["sensitivity"] + in_sample["specificity"] - 1 > 0.08
    assert held_out["sensitivity"] + held_out["specificity"] - 1 < 0.05


def test_recalibration_recovers_a_shifted_site(card):
    labels, logits = shifted_logits(600, seed=3)
    shipped = replace(card, temperature=1.0, threshold=0.5)
    site = fit_site_calibration(labels, logits, shipped, "site-a", folds=5)
    assert site.as_shipped["at_threshold"]["specificity"] < 0.75  # the shift over-calls at 0.5
    estimate = site.cross_validated["at_threshold"]
    assert estimate["sensitivity"] > 0.85 and estimate["specificity"] > 0.85
    for part in (site.as_shipped, site.cross_validated):
        for key, (low, high) in part["at_threshold_ci95"].items():
            assert low <= part["at_threshold"][key] <= high and high - low < 0.15
    assert site.calibration.threshold > 0.5
    ruled_out = site.cross_validated["strata"]["likely_normal"]["share_of_pneumonia"]
    assert ruled_out <= 0.05  # the 0.98 rule-out target, held out, within sampling error
    counts = {"n": 600, "pneumonia": int(labels.sum()), "normal": int(600 - labels.sum())}
    assert site.cases == {**counts, "studies": counts, "labels_sha256": site.cases["labels_sha256"]}


def test_apply_binds_to_one_model_and_roundtrips(tmp_path, card):
    labels, logits = shifted_logits(200, seed=4)
    site = fit_site_calibration(labels, logits, card, "site-b", folds=4)
    path = tmp_path / "site.json"
    site.save(path)
    loaded = SiteCalibration.load(path)
    assert loaded.sha256 == site.sha256 and loaded.calibration == site.calibration
    applied = loaded.apply(card)
    assert (applied.temperature, applied.threshold, applied.strata) == (
        site.calibration.temperature, site.calibration.threshold, site.calibration.strata)
    assert applied.extra["site_calibration"]["sha256"] == site.sha256
    assert applied.sha256 == card.sha256 and applied.labels == card.labels
    with pytest.raises(ModelIntegrityError, match="fitted for model sha256"):
        loaded.apply(replace(card, sha256="0" * 64))
    text = path.read_text()
    assert "site-b" in text and "case_" not in text  # counts and a label hash only, no case paths


@pytest.mark.parametrize("labels, folds, message", [
    (np.array([1] * 30 + [0] * 9), 5, "at least 10"),
    (np.array([1] * 30 + [2] * 30), 5, "0 \\(normal\\) or 1"),
    (np.array([1] * 30 + [0] * 12), 13, "folds must be between"),
])
def test_refuses_too_few_cases_bad_labels_and_folds(labels, folds, message):
    with pytest.raises(ValueError, match=message):
        check_cases(labels, folds)


def test_small_sets_carry_a_warning(card):
    labels = np.array([1] * 20 + [0] * 20)
    logits = np.stack([np.zeros(40), labels * 2.0 + np.linspace(-1, 1, 40)], axis=1)
    site = fit_site_calibration(labels, logits, card, "tiny", folds=4)
    advice = [w for w in site.warnings if not w.startswith("held out")]  # a held-out target may be missed too
    assert len(advice) == 2 and "20 pneumonia" in advice[0]


def test_load_refuses_files_that_are_not_site_calibrations(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"name": "a model card"}))
    with pytest.raises(ModelIntegrityError, match="not a site calibration"):
        SiteCalibration.load(tmp_path / "x.json")
    with pytest.raises(ModelIntegrityError, match="unreadable"):
        SiteCalibration.load(tmp_path / "missing.json")


def test_cases_csv_errors_name_the_line(tmp_path, test_split):
    images, labels = test_split
    csv_path = write_labelled_cases(tmp_path, images[:3], labels[:3])
    assert [int(v) for v in read_cases(csv_path)[1]] == [int(v) for v in labels[:3]]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ncase_00000.png,normal\ncase_00001.png,maybe\n")
    with pytest.raises(ValueError, match="line 3"):
        read_cases(bad)
    (tmp_path / "nolabel.csv").write_text("path\ncase_00000.png\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        read_cases(tmp_path / "nolabel.csv")
    (tmp_path / "case_00001.png").write_bytes(b"not an image")
    paths, _, _ = read_cases(csv_path)
    with pytest.raises(UnreadableImageError, match="line 3") as error:
        case_logits(PneumoniaDetector(), paths)
    assert "case_00001" not in str(error.value)


def test_cli_fits_and_the_detector_serves_it(tmp_path, test_split):
    """Real PneumoniaMNIST test images -> `pneumonia-worker calibrate` -> PneumoniaDetector(site_calibration=)."""
    images, labels = test_split
    chosen = np.concatenate([np.flatnonzero(labels == 1)[:16], np.flatnonzero(labels == 0)[:16]])
    csv_path = write_labelled_cases(tmp_path / "cases", images[chosen], labels[chosen])
    out = tmp_path / "site.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "calibrate", "--cases", str(csv_path),
                           "--site", "ward-7", "--out", str(out), "--folds", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "32 studies (16 pneumonia, 16 normal)" in done.stdout and "4-fold held out" in done.stdout
    site = SiteCalibration.load(out)
    detector = PneumoniaDetector(site_calibration=out)
    assert detector.card.threshold == site.calibration.threshold
    p = float(detector.pneumonia_probability(detector.preprocess([images[chosen[0]]]))[0])
    result = detector.predict(images[chosen[0]])
    assert result["probabilities"]["Pneumonia"] == pytest.approx(p)
    assert result["stratum"] == site.apply(load_card(default_model_path())).stratum_for(p)


@pytest.mark.parametrize("targets", [dict(rule_out_sensitivity=98), dict(rule_out_sensitivity=1.05),
                                     dict(high_suspicion_specificity=0), dict(high_suspicion_specificity=95)])
def test_targets_must_be_shares_not_percentages(targets):
    with pytest.raises(ValueError, match="must be a share in"):
        StrataTargets(**targets)


def test_perfectly_separated_cases_keep_the_cards_temperature(card):
    """Clear-cut local cases: NLL has no minimum, a fitted temperature would saturate every probability."""
    labels = np.array([1] * 20 + [0] * 20)
    margin = np.where(labels == 1, 2.0, -2.0) + np.linspace(0, 1, 40)
    logits = np.stack([np.zeros(40), margin], axis=1)
    site = fit_site_calibration(labels, logits, card, "clear-cut", folds=4)
    assert site.calibration.temperature == card.temperature
    assert any("separated perfectly" in warning for warning in site.warnings)
    cuts = [s.lower for s in site.calibration.strata[1:]] + [site.calibration.threshold]
    assert max(cuts) < 0.99, cuts
    probability = calibrated_probability(logits, site.calibration.temperature)
    assert binary_metrics(labels, probability, site.calibration.threshold)["accuracy"] == 1.0


def test_cases_the_model_ranks_backwards_are_refused(card):
    labels, logits = shifted_logits(200, seed=5)
    with pytest.raises(ValueError, match="check the CSV's labels"):
        fit_site_calibration(1 - labels, logits, card, "swapped", folds=5)


def test_a_file_listed_twice_or_a_row_without_path_is_refused(tmp_path, test_split):
    images, labels = test_split
    write_labelled_cases(tmp_path, images[:2], labels[:2])
    (tmp_path / "twice.csv").write_text("path,label\ncase_00000.png,normal\ncase_00001.png,1\n./case_00000.png,0\n")
    with pytest.raises(ValueError, match="line 4: the same file as line 2"):
        read_cases(tmp_path / "twice.csv")
    (tmp_path / "short.csv").write_text("label,path\nnormal,case_00000.png\n1\n")
    with pytest.raises(ValueError, match="line 3: no path"):
        read_cases(tmp_path / "short.csv")


def test_lines_are_the_files_own_after_blank_lines(tmp_path, test_split):
    """csv skips blank lines: counting rows sent the admin to remove a valid case on the line above."""
    images, labels = test_split
    write_labelled_cases(tmp_path, images[:3], labels[:3])
    (tmp_path / "gaps.csv").write_text("path,label\n\ncase_00000.png,normal\n\ncase_00001.png,maybe\n")
    with pytest.raises(ValueError, match="line 5: label"):
        read_cases(tmp_path / "gaps.csv")
    (tmp_path / "gaps.csv").write_text("path,label\n\ncase_00000.png,normal\n\ncase_00001.png,1\ncase_00002.png,0\n")
    paths, _, lines = read_cases(tmp_path / "gaps.csv")
    assert lines == [3, 5, 6]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(paths[1])  # a blank picture, which the detector refuses
    with pytest.raises(UnreadableImageError, match=r"1 case\(s\) unreadable.*: line 5 \(image is blank"):
        case_logits(PneumoniaDetector(), paths, lines=lines)


@pytest.mark.parametrize("damage", ["strata_reversed", "negative_temperature", "no_targets", "strata_gap"])
def test_load_refuses_implausible_files_as_integrity_errors(tmp_path, card, damage):
    """The worker retries a ModelIntegrityError as a deployment fault; anything else would fail instances."""
    labels, logits = shifted_logits(200, seed=4)
    data = fit_site_calibration(labels, logits, card, "site-a", folds=5).to_dict()
    strata = data["calibration"]["strata"]
    if damage == "strata_reversed":
        strata[0]["name"], strata[2]["name"] = strata[2]["name"], strata[0]["name"]
    elif damage == "negative_temperature":
        data["calibration"]["temperature"] = -3.3
    elif damage == "no_targets":
        del data["targets"]
    else:
        strata[1]["upper"] = strata[2]["lower"] - 0.01
    (tmp_path / "s.json").write_text(json.dumps(data))
    with pytest.raises(ModelIntegrityError, match="unreadable or invalid"):
        SiteCalibration.load(tmp_path / "s.json")


def test_no_cases_left_gives_the_case_count_not_a_numpy_error(card):
    logits = case_logits(PneumoniaDetector(), [])
    with pytest.raises(ValueError, match="the smaller class has 0"):
        fit_site_calibration(np.zeros(0, dtype=np.int64), logits, card, "none", folds=5)


def test_a_case_the_preprocessing_refuses_is_named_by_its_line(tmp_path, test_split):
    """Images that read but that preprocessing refuses (too small, too long, 12-bit values unscaled)
    stopped the fit with the first reason only and no line: with hundreds of cases, a hunt by hand."""
    from PIL import Image

    images, labels = test_split
    csv_path = write_labelled_cases(tmp_path, images[:4], labels[:4])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "case_00001.png")
    Image.fromarray(images[3].astype(np.uint16) * 16).save(tmp_path / "case_00003.png")  # 12-bit, unscaled
    paths, _, _ = read_cases(csv_path)
    with pytest.raises(UnreadableImageError) as error:
        case_logits(PneumoniaDetector(), paths)
    message = str(error.value)
    assert message.startswith("2 case(s) unreadable")
    assert "line 3 (image side 20 is smaller" in message and "line 5 (16-bit image uses only its low 12 bits" in message


def test_the_saved_file_is_strict_json_and_keeps_its_identity(tmp_path, card):
    """An empty stratum's PPV (the 1.1.0 card's indeterminate band) was written as a bare NaN, which
    JSON.parse, Go, serde and PostgreSQL's jsonb refuse. Read back, null is NaN again: same sha256."""
    labels, logits = shifted_logits(200, seed=4)
    site = fit_site_calibration(labels, logits, card, "site-b", folds=4)
    empty = {**site.as_shipped, "strata": {**site.as_shipped.get("strata", {}), "indeterminate": {"ppv": float("nan")}}}
    site = replace(site, as_shipped=empty)
    path = tmp_path / "site.json"
    site.save(path)
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    loaded = SiteCalibration.load(path)
    assert np.isnan(loaded.as_shipped["strata"]["indeterminate"]["ppv"])
    assert loaded.sha256 == site.sha256


def test_a_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path, test_split):
    images, labels = test_split
    csv_path = write_labelled_cases(tmp_path, images[:3], labels[:3])
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # Excel's "CSV UTF-8"
    assert [int(v) for v in read_cases(csv_path)[1]] == [int(v) for v in labels[:3]]


def test_folds_keep_each_study_in_one_fold():
    """Two images of one study in two folds: cut-points fitted on one image were scored on the other."""
    labels = np.repeat([1] * 12 + [0] * 12, 2)  # 24 studies of two images each
    groups = np.repeat(np.arange(24), 2)
    folds = stratified_folds(labels, 4, seed=0, groups=groups)
    assert all(len(set(folds[groups == study])) == 1 for study in range(24))
    for cls in (0, 1):  # still stratified: each class's studies spread evenly
        assert np.array_equal(np.bincount(folds[::2][labels[::2] == cls], minlength=4), [3, 3, 3, 3])
    singletons = np.array([1] * 7 + [0] * 5)  # one image per study: the folds as before groups existed
    assert np.array_equal(stratified_folds(singletons, 3, 1, groups=np.arange(12)), stratified_folds(singletons, 3, 1))


def test_a_study_s_images_count_once(card):
    """Ten studies per class as twenty images each passed the minimum; the CIs count studies too."""
    labels = np.repeat([1] * 8 + [0] * 8, 2)
    with pytest.raises(ValueError, match="the smaller class has 8"):
        check_cases(labels, 4, groups=np.repeat(np.arange(16), 2))
    labels, logits = shifted_logits(120, seed=6)
    images, groups = np.repeat(labels, 2), np.repeat(np.arange(120), 2)
    twice = np.repeat(logits, 2, axis=0) + np.tile([[0.0, 0.0], [0.0, 0.05]], (120, 1))  # a repeat exposure
    site = fit_site_calibration(images, twice, card, "two-views", folds=5, groups=groups)
    once = fit_site_calibration(labels, logits, card, "one-view", folds=5)
    assert site.cases["n"] == 240 and site.cases["studies"] == {"n": 120, "pneumonia": int(labels.sum()),
                                                                "normal": int(120 - labels.sum())}
    for key in ("sensitivity", "specificity"):  # resampled by study: as wide as for the studies, not narrower
        width = np.diff(site.cross_validated["at_threshold_ci95"][key])[0]
        assert width > 0.8 * np.diff(once.cross_validated["at_threshold_ci95"][key])[0]


def test_copies_and_one_instance_exported_twice_are_refused_by_line(tmp_path, test_split):
    """A copied PNG (same content) or one DICOM instance in two export folders (same SOP Instance UID)
    counted twice and could sit in a fitting fold and a held-out one; both lines are named."""
    import shutil

    from models.dicom_io import read_dicom
    from models.site_calibration import case_groups
    from worker.samples import make_cxr_dataset, save

    images, labels = test_split
    write_labelled_cases(tmp_path, images[:2], labels[:2])
    shutil.copy(tmp_path / "case_00000.png", tmp_path / "copy.png")
    (tmp_path / "c.csv").write_text("path,label\ncase_00000.png,0\ncase_00001.png,1\n\ncopy.png,0\n")
    paths, y, lines = read_cases(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="c.csv line 5: the same image content .* as line 2"):
        case_groups(paths, y, lines, [None] * 3, "c.csv")

    instance = make_cxr_dataset(images[0], size=(64, 64))
    for folder in ("export1", "export2"):
        save(instance, tmp_path / folder / "i.dcm")
    paths = [tmp_path / "export1" / "i.dcm", tmp_path / "export2" / "i.dcm"]
    headers = [read_dicom(str(p), stop_before_pixels=True) for p in paths]
    with pytest.raises(ValueError, match="d.csv line 3: the same DICOM instance .* as line 2"):
        case_groups(paths, np.array([1, 1]), [2, 3], headers, "d.csv")


def test_a_study_s_images_share_a_group_and_one_label(tmp_path, test_split):
    from models.dicom_io import read_dicom
    from models.site_calibration import case_groups
    from worker.samples import write_sample_study

    images, _ = test_split
    study = write_sample_study(tmp_path / "s", images[:2], size=(64, 64))
    other = write_sample_study(tmp_path / "o", images[2:3], size=(64, 64))
    write_labelled_cases(tmp_path, images[3:4], np.array([0]))
    paths = [*study, *other, tmp_path / "case_00000.png"]
    headers = [read_dicom(str(p), stop_before_pixels=True) for p in paths[:3]] + [None]
    groups = case_groups(paths, np.array([1, 1, 0, 0]), [2, 3, 4, 5], headers, "s.csv")
    assert groups[0] == groups[1] and len({groups[1], groups[2], groups[3]}) == 3
    with pytest.raises(ValueError, match="s.csv lines 2 and 3: two images of one study .* labelled differently"):
        case_groups(paths, np.array([1, 0, 0, 0]), [2, 3, 4, 5], headers, "s.csv")
    with pytest.raises(ValueError, match="line 4: the same image content .* as line 2; line 5: the same DICOM .* 3"):
        case_groups([paths[3], paths[0]] * 2, np.zeros(4), [2, 3, 4, 5], [None, headers[0]] * 2, "t.csv")


def test_held_out_strata_are_compared_with_their_targets(card):
    """The fitted cut-points meet their targets on the cases they were fitted on; held out they may not,
    and a miss (here the rule-out band's) was in the file but never said."""
    labels, logits = shifted_logits(200, seed=6)
    site = fit_site_calibration(labels, logits, card, "site-c", folds=5)
    held_out = site.cross_validated
    strata = held_out["strata"]
    figures = held_out["at_targets"]
    assert figures["rule_out_sensitivity"] == pytest.approx(1 - strata["likely_normal"]["share_of_pneumonia"])
    assert figures["high_suspicion_specificity"] == pytest.approx(1 - strata["high_suspicion"]["share_of_normal"])
    for key, (low, high) in held_out["at_targets_ci95"].items():
        assert low <= figures[key] <= high
    assert "rule_out_sensitivity" in site.as_shipped["at_targets"]
    assert figures["rule_out_sensitivity"] < 0.98
    misses = [w for w in site.warnings if w.startswith("held out")]
    assert any("pneumonia cases stayed out of likely_normal" in w and "target of 98.0%" in w for w in misses)
    for targets in (StrataTargets(0.85, 0.85), StrataTargets(0.9, 0.97)):  # a warning exactly where one is missed
        fit = fit_site_calibration(labels, logits, card, "site-c", targets, folds=5)
        for key, words in (("rule_out_sensitivity", "out of likely_normal"),
                           ("high_suspicion_specificity", "out of high")):
            missed = fit.cross_validated["at_targets"][key] < getattr(targets, key)
            assert missed == any(w.startswith("held out") and words in w for w in fit.warnings), (targets, key)


def test_save_replaces_the_file_whole_or_not_at_all(tmp_path, card, monkeypatch):
    """`--out` may be the file the worker serves: a write cut short (a full disk) left half a file."""
    labels, logits = shifted_logits(200, seed=4)
    site = fit_site_calibration(labels, logits, card, "site-b", folds=4)
    path = tmp_path / "site.json"
    path.write_text("the deployed calibration")
    path.chmod(0o640)

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", full_disk)
        with pytest.raises(OSError):
            site.save(path)
    assert path.read_text() == "the deployed calibration" and os.listdir(tmp_path) == ["site.json"]
    site.save(path)
    assert SiteCalibration.load(path).sha256 == site.sha256 and os.listdir(tmp_path) == ["site.json"]
    assert path.stat().st_mode & 0o777 == 0o640  # the replaced file's permissions, which the worker reads by


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_save_keeps_the_owner_and_group_of_the_file_it_replaces(tmp_path, card):
    """An admin re-fitting as root over the file the worker's user serves left one owned by root: with mode
    0640 the worker could no longer read its calibration and retried every image as a deployment fault."""
    labels, logits = shifted_logits(200, seed=4)
    site = fit_site_calibration(labels, logits, card, "site-b", folds=4)
    path = tmp_path / "site.json"
    path.write_text("the deployed calibration")
    path.chmod(0o640)
    os.chown(path, 65534, 65534)
    site.save(path)
    assert (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o777) == (65534, 65534, 0o640)
    assert SiteCalibration.load(path).sha256 == site.sha256


def test_save_writes_through_a_symbolic_link(tmp_path, card):
    """A deployment pointing TRIAGE_SITE_CALIBRATION at a link's target kept the old calibration: the
    atomic rename replaced the link itself."""
    labels, logits = shifted_logits(200, seed=4)
    site = fit_site_calibration(labels, logits, card, "site-b", folds=4)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "cal.json"
    target.write_text("old")
    (tmp_path / "site.json").symlink_to(target)
    site.save(tmp_path / "site.json")
    assert (tmp_path / "site.json").is_symlink() and SiteCalibration.load(target).sha256 == site.sha256
