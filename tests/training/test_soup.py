"""Model soup: which runs may be averaged, the average itself, and a tiny soup through the CLI."""

import json
from pathlib import Path

import pytest
import torch

from models.card import ModelCard, sha256_of
from training.cli import main
from training.config import TrainConfig
from training.seeds import load_seed_run
from training.soup import average_states, check_ingredients
from training.train import build_network

COMMON = ["--subset", "40", "--epochs", "1", "--samples-per-epoch", "0", "--batch-size", "16", "--no-progress",
          "--weights", "none", "--frozen", "conv1,bn1,layer1,layer2", "--bootstrap", "20", "--ema-decay", "0.9"]
"""`--frozen` given: with `--weights none` nothing would be frozen, and the test checks a frozen BN's average."""


def test_average_is_elementwise_and_keeps_integer_counters():
    states = [{"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}, {"w": torch.tensor([3.0, 7.0]), "n": torch.tensor(9)}]
    averaged = average_states(states)
    assert torch.equal(averaged["w"], torch.tensor([2.0, 5.0])) and int(averaged["n"]) == 5


def test_ingredients_must_share_their_starting_point():
    base = {"weights": "none", "resnet_v1_strides": False, "frozen": ["conv1"], "hidden": 512, "dropout": 0.5,
            "init_seed": 0, "image_size": 28}
    dirs = [Path("a"), Path("b")]
    check_ingredients([base, dict(base)], dirs)
    with pytest.raises(ValueError, match="--init-seed"):
        check_ingredients([{**base, "init_seed": None}, {**base, "init_seed": None}], dirs)
    with pytest.raises(ValueError, match="hidden"):
        check_ingredients([base, {**base, "hidden": 256}], dirs)
    with pytest.raises(ValueError, match="two"):
        check_ingredients([base], dirs[:1])
    with pytest.raises(ValueError, match="is the same run as a: the soup would count it twice"):
        check_ingredients([base, dict(base)], [Path("a"), Path("b/../a")])  # was averaged with itself


def test_init_seed_fixes_the_head_whatever_the_run_seed():
    def head(seed: int, init_seed: int | None) -> torch.Tensor:
        torch.manual_seed(seed)
        return build_network(TrainConfig(weights="none", seed=seed, init_seed=init_seed)).fc[0].weight
    assert torch.equal(head(1, 0), head(2, 0))
    assert not torch.equal(head(1, None), head(2, None))


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("soup")
    dirs = [root / f"seed-{seed}" for seed in (1, 2)]
    for seed, out in zip((1, 2), dirs):
        assert main(["train", "--data-root", str(data_root), *COMMON, "--seed", str(seed), "--init-seed", "0",
                     "--out-dir", str(out)]) == 0
    return root, dirs


def test_soup_averages_weights_and_ships_like_a_run(ingredients, data_root):
    root, dirs = ingredients
    out = root / "soup"
    assert main(["soup", *map(str, dirs), "--data-root", str(data_root), *COMMON, "--init-seed", "0",
                 "--out-dir", str(out)]) == 0
    assert main(["evaluate", "--data-root", str(data_root), *COMMON, "--out-dir", str(dirs[0])]) == 0
    states = [torch.load(d / "best.pt", weights_only=True)["model"] for d in dirs]
    soup = torch.load(out / "best.pt", weights_only=True)["model"]
    for key in ("layer4.2.conv3.weight", "fc.3.weight", "layer1.0.bn1.running_mean"):  # weights and a frozen BN
        torch.testing.assert_close(soup[key], (states[0][key] + states[1][key]) / 2)
    assert not torch.allclose(soup["layer4.2.bn3.running_var"], (states[0]["layer4.2.bn3.running_var"]
                                                                 + states[1]["layer4.2.bn3.running_var"]) / 2)
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["soup_of"] == {str(d): sha256_of(d / "best.pt") for d in dirs} and run_info["batchnorm_images"] > 0
    card = ModelCard.load(out / "pneumonia_resnet50.card.json")
    assert card.extra["onnx"]["parity"]["passed"]
    assert load_seed_run(out).label == "soup-init0" and load_seed_run(dirs[0]).label == "1"


def test_soup_refuses_flags_that_differ_from_its_runs(ingredients, data_root, capsys):
    root, dirs = ingredients
    assert main(["soup", *map(str, dirs), "--data-root", str(data_root), *COMMON, "--resnet-v1-strides",
                 "--out-dir", str(root / "bad")]) == 2
    assert "resnet_v1_strides" in capsys.readouterr().err


def test_soup_can_keep_the_averaged_batchnorm_statistics(ingredients, data_root):
    root, dirs = ingredients
    out = root / "soup-averaged-bn"
    assert main(["soup", *map(str, dirs), "--keep-averaged-bn", "--data-root", str(data_root), *COMMON,
                 "--init-seed", "0", "--out-dir", str(out)]) == 0
    states = [torch.load(d / "best.pt", weights_only=True)["model"] for d in dirs]
    soup = torch.load(out / "best.pt", weights_only=True)["model"]
    key = "layer4.2.bn3.running_var"
    torch.testing.assert_close(soup[key], (states[0][key] + states[1][key]) / 2)
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["batchnorm"] == "averaged" and run_info["batchnorm_images"] == 0
