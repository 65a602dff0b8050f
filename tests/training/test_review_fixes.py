"""Defects a review found: combined models' cards, weights provenance from any working directory, refusals
of bad values, resume schedules, diverged runs, per-class nulls, the plain shuffle's length, the data root."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import ModelCard, sha256_of, strict_json
from tests.training.conftest import TINY_FLAGS, build_tiny, tiny_config, use_tiny_network
from training.cli import build_parser, config_from_args, main
from training.config import WEIGHTS_ENV, TrainConfig, for_members
from training.data import ensure_dataset
from training.errors import InputMissingError, RefusedError
from training.evaluate import check_finite, full_report
from training.export import weights_origin
from training.runtime import make_runtime
from training.train import epoch_indices, fit

CARD = "pneumonia_resnet50.card.json"
MEMBER_RECIPE = ["--lr", "3e-4", "--epochs", "1"]
"""Not the command defaults (lr 1e-4, 12 epochs; TINY_FLAGS' ema 0.9 is not 0.98 either): a card that
recorded the combining command's own flags would show them."""


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def members(tmp_path_factory, data_root):
    """Two exported tiny runs of one recipe, seeds 1 and 2, from random weights."""
    root = tmp_path_factory.mktemp("members")
    dirs = [root / f"seed-{seed}" for seed in (1, 2)]
    with pytest.MonkeyPatch.context() as patch:
        use_tiny_network(patch)
        patch.delenv(WEIGHTS_ENV, raising=False)
        for seed, out in zip((1, 2), dirs):
            assert main(["run", "--data-root", str(data_root), *TINY_FLAGS, *MEMBER_RECIPE, "--seed", str(seed),
                         "--init-seed", "0", "--out-dir", str(out)]) == 0
    return root, dirs


def combining_flags(data_root) -> list[str]:
    """What a user passes to `ensemble`/`quantize`: the data, not the recipe (weights left to their default)."""
    return ["--data-root", str(data_root), "--subset", "40", "--bootstrap", "20", "--no-progress",
            "--device", "cpu", "--calibration-images", "8"]


def assert_members_recipe(training: dict, origin: dict) -> None:
    assert (training["weights"], training["lr"], training["ema_decay"], training["epochs"]) == ("none", 3e-4, 0.9, 1)
    assert origin["kind"] == "none"


def test_ensemble_cards_its_members_recipes_not_its_own_flags(members, data_root):
    root, dirs = members
    out = root / "ensemble"
    assert main(["ensemble", *map(str, dirs), *combining_flags(data_root), "--out-dir", str(out)]) == 0
    card = ModelCard.load(out / CARD)
    assert_members_recipe(card.extra["training"], card.extra["weights_origin"])
    assert json.loads((out / "config.json").read_text())["weights"] == "none"
    recorded = card.to_dict()["ensemble"]["members"]
    assert [m["seed"] for m in recorded] == [1, 2] and all(m["training"]["lr"] == 3e-4 for m in recorded)


def test_quantize_on_a_copied_model_cards_the_fp32_cards_recipe(members, data_root, tmp_path):
    _, dirs = members
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("pneumonia_resnet50.onnx", CARD):
        shutil.copy(dirs[0] / name, copy / name)
    assert main(["quantize", *combining_flags(data_root), "--out-dir", str(copy)]) == 0
    card = ModelCard.load(copy / "pneumonia_resnet50.int8.card.json")
    assert_members_recipe(card.extra["training"], card.extra["weights_origin"])


def test_soup_cards_its_ingredients_recipe(members, data_root):
    root, dirs = members
    out = root / "soup"
    with pytest.MonkeyPatch.context() as patch:
        use_tiny_network(patch)
        patch.setattr("training.soup.build_model", build_tiny)
        assert main(["soup", *map(str, dirs), "--data-root", str(data_root), *TINY_FLAGS, "--out-dir", str(out)]) == 0
    card = ModelCard.load(out / CARD)
    assert_members_recipe(card.extra["training"], card.extra["weights_origin"])


def copied_members(members, tmp_path) -> list[Path]:
    """The members copied, for tests that try to overwrite them (the module's own stay intact)."""
    _, dirs = members
    return [Path(shutil.copytree(d, tmp_path / d.name)) for d in dirs]


def soup_args(data_root, dirs, out) -> list[str]:
    return ["soup", *map(str, dirs), "--data-root", str(data_root), *TINY_FLAGS, "--out-dir", str(out)]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_soup_and_ensemble_never_write_into_one_of_their_runs(members, data_root, tmp_path, monkeypatch, capsys):
    """Into a member's folder, the soup replaced its best.pt, config.json and history.json (and recorded its own
    sha256 as the member's); the ensemble replaced its ONNX model, then failed parity with a traceback."""
    use_tiny_network(monkeypatch)
    monkeypatch.setattr("training.soup.build_model", build_tiny)
    dirs = copied_members(members, tmp_path)
    (tmp_path / "link").symlink_to(dirs[1], target_is_directory=True)
    before = files_of(dirs[1])
    for out in (dirs[1], tmp_path / "link"):
        for overwrite in ([], ["--overwrite"]):
            commands = {"ensemble": ["ensemble", *map(str, dirs), *combining_flags(data_root), "--out-dir", str(out)],
                        "soup": soup_args(data_root, dirs, out)}
            for stage, args in commands.items():
                assert main([*args, *overwrite]) == 2, (stage, out, overwrite)
                err = capsys.readouterr().err
                assert f"pneumonia-train {stage}: --out-dir {out} is {dirs[1]}, one of the runs this {stage} combines" in err
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert files_of(dirs[1]) == before


def test_soup_and_ensemble_replace_another_run_only_with_overwrite(members, data_root, tmp_path, monkeypatch, capsys):
    """Into another finished run's folder both succeeded silently, mixing the two runs' files (its last.pt
    stayed beside the combined model). A second soup or ensemble into its own folder needs --overwrite too."""
    use_tiny_network(monkeypatch)
    monkeypatch.setattr("training.soup.build_model", build_tiny)
    _, dirs = members
    for stage in ("ensemble", "soup"):
        other = Path(shutil.copytree(dirs[0], tmp_path / f"other-{stage}"))  # a finished run, not a member
        before = files_of(other)
        args = (["ensemble", *map(str, dirs), *combining_flags(data_root), "--out-dir", str(other)] if stage == "ensemble"
                else soup_args(data_root, dirs, other))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"--out-dir {other} already holds a run (best.pt, last.pt, evaluation.json)" in err and "--overwrite" in err
        assert files_of(other) == before
        assert main([*args, "--overwrite"]) == 0
        assert not (other / "last.pt").exists() and (stage == "soup") == (other / "best.pt").exists()
        assert json.loads((other / "run_info.json").read_text())["command"].startswith(f"pneumonia-train {stage} ")
        assert main(args) == 2 and "already holds a run" in capsys.readouterr().err  # its own folder now
        assert main([*args, "--overwrite"]) == 0
    soup_of = json.loads((tmp_path / "other-soup" / "run_info.json").read_text())["soup_of"]
    assert soup_of == {str(d): sha256_of(d / "best.pt") for d in dirs}


def test_soup_and_ensemble_refuse_a_run_listed_twice(members, data_root, tmp_path, monkeypatch, capsys):
    """`ensemble run1 run1` built a graph of one member twice (`seeds run1 run1` refused the same input)."""
    use_tiny_network(monkeypatch)
    monkeypatch.setattr("training.soup.build_model", build_tiny)
    _, dirs = members
    (tmp_path / "link").symlink_to(dirs[0], target_is_directory=True)
    out = tmp_path / "out"
    for again in (dirs[0], tmp_path / "link"):
        twice = [dirs[0], again]
        for stage, args in {"ensemble": ["ensemble", *map(str, twice), *combining_flags(data_root), "--out-dir", str(out)],
                            "soup": soup_args(data_root, twice, out)}.items():
            assert main(args) == 2, (stage, again)
            err = capsys.readouterr().err
            assert f"pneumonia-train {stage}: {again} is the same run as {dirs[0]}: the {stage} would count it twice" in err
    assert not out.exists()


def test_runs_combined_into_one_model_must_share_images_and_weights(tmp_path):
    dirs = []
    for name, weights in (("a", "none"), ("b", "IMAGENET1K_V2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(TrainConfig(weights=weights).to_dict()))
        dirs.append(tmp_path / name)
    with pytest.raises(RefusedError, match="weights='IMAGENET1K_V2'"):
        for_members(TrainConfig(), dirs, ("image_size",))
    with pytest.raises(RefusedError, match="image_size"):
        for_members(TrainConfig(image_size=64), dirs[:1], ("image_size",))


def test_combined_runs_compare_start_weights_by_sha256_and_keep_the_command_s_seed(tmp_path):
    """A second look: runs from one weights file under two paths (another folder, the GPU machine) were
    refused on the path; a soup's or ensemble's --seed (its CIs, its int8 calibration pick; the published
    soups passed --seed 0) was replaced by the first run's."""
    dirs = []
    for name, weights, seed in (("a", "/root/dev/weights/start.safetensors", 1), ("b", "../shared/start.safetensors", 2)):
        (tmp_path / name).mkdir()
        recipe = TrainConfig(weights=weights, seed=seed).to_dict() | {"weights_sha256": "ab" * 32}
        (tmp_path / name / "config.json").write_text(json.dumps(recipe))
        dirs.append(tmp_path / name)
    combined = for_members(TrainConfig(seed=0), dirs, ("image_size",))
    assert combined.seed == 0 and combined.weights == "/root/dev/weights/start.safetensors"
    (tmp_path / "b" / "config.json").write_text(json.dumps(TrainConfig(weights="../shared/start.safetensors").to_dict()
                                                           | {"weights_sha256": "cd" * 32}))
    with pytest.raises(RefusedError, match="weights"):
        for_members(TrainConfig(), dirs, ("image_size",))


def test_quantize_on_a_copied_model_checks_only_the_images_not_the_network_flags(members, data_root, tmp_path):
    """README quantizes a copy of the shipped model without --resnet-v1-strides: an ONNX graph, no
    checkpoint to misread, so its card's network flags are not the command's business."""
    _, dirs = members
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(dirs[0] / "pneumonia_resnet50.onnx", copy / "pneumonia_resnet50.onnx")
    card = json.loads((dirs[0] / CARD).read_text())
    card["training"]["resnet_v1_strides"] = not card["training"].get("resnet_v1_strides", False)
    (copy / CARD).write_text(json.dumps(card))
    assert main(["quantize", *combining_flags(data_root), "--out-dir", str(copy)]) == 0


def test_a_single_run_can_still_be_summarised_against_a_baseline(members, tmp_path):
    """README summarises one soup or one ensemble against its ingredients (`seeds RUN --baseline ...`)."""
    _, dirs = members
    assert main(["seeds", *map(str, dirs), "--out", str(tmp_path / "both"), "--bootstrap", "20"]) == 0
    assert main(["seeds", str(dirs[0]), "--out", str(tmp_path / "one"), "--baseline", str(tmp_path / "both"),
                 "--bootstrap", "20"]) == 0


def test_weights_origin_names_the_file_from_any_working_directory(tmp_path, monkeypatch):
    """config.json kept a relative --weights; export from elsewhere carded it as a torchvision name, no sha256."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "start.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    config = config_from_args(build_parser().parse_args(["train", "--weights", "w/start.safetensors"]))
    assert config.weights == str(tmp_path / "w" / "start.safetensors")
    assert config.weights_sha256 == sha256_of(tmp_path / "w" / "start.safetensors")
    monkeypatch.chdir("/")
    (tmp_path / "w" / "start.safetensors").unlink()  # moved since: the recorded sha256 still names it
    origin = weights_origin(config)
    assert (origin["kind"], origin["name"], origin["sha256"]) == ("file", "start.safetensors", config.weights_sha256)


@pytest.mark.parametrize("flags, says", [
    (["--lr", "-1"], "lr must be positive"), (["--dropout", "1.5"], "dropout must lie in [0, 1)"),
    (["--ema-decay", "1.5"], "ema_decay"), (["--label-smoothing", "3"], "label_smoothing"),
    (["--hidden", "-1"], "hidden must be at least 1"), (["--hidden", "0"], "hidden must be at least 1"),
    (["--threads", "-1"], "threads"), (["--subset", "0"], "subset must be at least 1"),
    (["--patience", "0"], "patience must be at least 1"), (["--plateau-factor", "1"], "plateau_factor"),
    (["--aug-hflip-p", "5"], "hflip_p"), (["--aug-erase-area", "0.5", "0.1"], "erase_area"),
    (["--aug-scale-min", "0"], "scale_min"), (["--device", "bogus"], "not a torch device"),
    (["--distill-from", "/nonexistent/run"], "--distill-from /nonexistent/run holds no config.json"),
])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tiny_network, tmp_path, data_root, flags, says,
                                                                      capsys):
    """Each was a traceback (some after config.json was written) or trained silently (a short tiny run if so)."""
    out = tmp_path / "run"
    subset = [] if "--subset" in flags else ["--subset", "40"]
    args = ["train", "--data-root", str(data_root), *subset, "--weights", "none", "--no-progress", "--epochs", "1",
            "--samples-per-epoch", "8", "--batch-size", "8", "--device", "cpu", "--out-dir", str(out), *flags]
    assert main(args) == 2
    assert says in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(RefusedError, match="CUDA GPU"):
        make_runtime("cuda")


def test_card_and_seeds_refuse_what_they_cannot_read(members, tmp_path, capsys):
    _, dirs = members
    onnx = dirs[0] / "pneumonia_resnet50.onnx"
    before = (dirs[0] / CARD).read_text()
    (tmp_path / "bad.json").write_text("{not json")
    cases = [(["card", str(tmp_path / "nope.onnx"), "--metrics", str(dirs[0] / "results" / "metrics.json")], "no model"),
             (["card", str(onnx), "--metrics", str(dirs[0] / "config.json")], "is not a run's metrics.json"),
             (["card", str(onnx), "--metrics", str(tmp_path / "bad.json")], "is not JSON"),
             (["seeds", *map(str, dirs), "--out", str(tmp_path / "s"), "--bootstrap", "0"], "bootstrap must be at least 1")]
    trained_only = tmp_path / "trained"
    trained_only.mkdir()
    shutil.copy(dirs[0] / "config.json", trained_only / "config.json")
    cases.append((["seeds", str(dirs[0]), str(trained_only), "--out", str(tmp_path / "s")], "holds no run_info.json"))
    for args, says in cases:
        assert main(args) == 2, args
        assert says in capsys.readouterr().err, args
    assert (dirs[0] / CARD).read_text() == before and not (tmp_path / "s").exists()


def test_a_resume_cannot_shorten_the_epochs_already_trained(tiny_network, data_root, tmp_path, capsys):
    """config.json and the card were rewritten to a 1-epoch schedule after 2 epochs had run."""
    run = tmp_path / "run"
    fit(tiny_config(run, data_root, epochs=2), make_runtime("cpu", "fp32"))
    saved = (run / "config.json").read_text()
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--hidden", "8", "--epochs", "1",
                 "--resume", str(run / "last.pt")]) == 2
    assert "has trained 2 epochs" in capsys.readouterr().err
    assert (run / "config.json").read_text() == saved


def test_a_diverged_run_is_refused_in_one_line(tiny_network, data_root, tmp_path, capsys):
    """lr 1e37 gave NaN logits, and sklearn's traceback from validation."""
    out = tmp_path / "run"
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--ema-decay", "0", "--lr", "1e37",
                 "--weight-decay", "0", "--epochs", "2", "--out-dir", str(out)]) == 2
    assert "training diverged at epoch 1" in capsys.readouterr().err
    with pytest.raises(RefusedError, match="diverged"):
        check_finite({False: np.array([[0.0, np.nan]])}, Path("best.pt"))


def test_per_class_report_writes_null_where_the_point_metrics_do():
    labels, probability = np.array([0, 1, 0, 1]), np.full(4, 0.1)  # nothing called Pneumonia: its precision is undefined
    report = json.loads(strict_json(full_report(labels, probability, 0.5, 5, 0)))
    assert report["point"]["precision"] is None
    assert report["per_class"]["Pneumonia"]["precision"] is None


def test_the_plain_shuffle_draws_as_many_samples_as_asked():
    labels = np.array([0, 1] * 20)
    config = TrainConfig(weighted_sampler=False, samples_per_epoch=100)
    order = epoch_indices(labels, config, torch.Generator().manual_seed(0))
    assert len(order) == 100
    assert sorted(order[:40].tolist()) == list(range(40))  # whole passes over the split, then part of one
    short = epoch_indices(labels, TrainConfig(weighted_sampler=False, samples_per_epoch=30), torch.Generator().manual_seed(0))
    assert torch.equal(short, order[:30])


def test_a_mistyped_data_root_is_not_created(tmp_path):
    typo = tmp_path / "dta" / "pneumonia"
    with pytest.raises(InputMissingError, match="--image-size 64"):
        ensure_dataset(typo, 64)
    assert not (tmp_path / "dta").exists()


def test_a_run_recorded_with_a_relative_weights_path_still_resumes(tiny_network, data_root, tmp_path, monkeypatch):
    """Runs from before weight files were recorded by absolute path: the same --weights from the same folder
    is the same file, not another recipe."""
    monkeypatch.chdir(tmp_path)
    Path("start.safetensors").write_bytes(b"weights")
    fit(tiny_config(tmp_path / "run", data_root, epochs=1, weights="start.safetensors"), make_runtime("cpu", "fp32"))
    assert main(["train", "--data-root", str(data_root), *TINY_FLAGS, "--weights", "start.safetensors", "--hidden", "8",
                 "--epochs", "2", "--resume", str(tmp_path / "run" / "last.pt")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["weights"] == str(tmp_path / "start.safetensors") and saved["weights_sha256"]


def test_an_older_runs_missing_weight_file_is_not_carded_as_a_torchvision_name(tmp_path):
    origin = weights_origin(TrainConfig(weights="../elsewhere/resnet50.safetensors"))
    assert (origin["kind"], origin["name"], origin["sha256"]) == ("file", "resnet50.safetensors", None)
