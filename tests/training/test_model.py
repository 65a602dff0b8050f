"""BatchNorm folding: the fused stem and the fused scoring copy compute what the plain network computes."""

import copy

import pytest
import torch
from torch import nn

from training.cli import build_parser, config_from_args
from training.config import TrainConfig
from training.model import (FusedStemNetwork, build_model, frozen_stem_names, fused_for_inference,
                            set_train_mode)
from training.train import training_forward

FROZEN = TrainConfig().frozen


@pytest.fixture(scope="module")
def network() -> nn.Module:
    """A v1-stride ResNet-50 whose BatchNorms hold non-trivial statistics and affine terms,
    so that folding has something to get wrong (fresh BNs are identity maps)."""
    torch.manual_seed(0)
    model = build_model("none", frozen=FROZEN, resnet_v1_strides=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("frozen, stem", [
    (FROZEN, ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")),
    (("conv1", "bn1"), ("conv1", "bn1")),
    (("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
     ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")),
    ((), ()),
    (("layer1", "layer2"), ()),  # conv1 trains: nothing before layer1 is frozen, so no stem
    (("conv1",), ("conv1",)),  # bn1 trains: conv1 alone runs gradient-free, nothing to fold
])
def test_the_stem_is_the_frozen_prefix(frozen, stem):
    assert frozen_stem_names(frozen) == stem


def logits_and_gradients(forward: nn.Module, network: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    network.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout mask every time
    logits = forward(x)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.requires_grad}


def test_fused_stem_is_the_same_function_and_gradient_in_fp64(network):
    """Folding is exact algebra: in float64 logits and every trainable gradient agree to ~1e-10."""
    network = copy.deepcopy(network).double()
    fused = FusedStemNetwork(network, FROZEN)
    set_train_mode(network, FROZEN)  # layer3/4 BNs use batch statistics, the head's dropout is live
    x = torch.randn(4, 3, 96, 96, dtype=torch.float64)
    plain_logits, plain_grads = logits_and_gradients(network, network, x)
    fused_logits, fused_grads = logits_and_gradients(fused, network, x)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-10, rtol=1e-8)
    assert fused_grads.keys() == plain_grads.keys() and any(k.startswith("layer3") for k in plain_grads)
    for name, expected in plain_grads.items():
        assert float((fused_grads[name] - expected).norm() / expected.norm()) < 1e-8, name
    assert all(p.grad is None for p in fused.stem.parameters())


def test_fused_stem_in_fp32_is_as_accurate_as_the_plain_network(network):
    """In float32 both differ from the float64 truth (train-mode BN on a small batch amplifies
    rounding to ~1% in some gradients); folding must not add more than that."""
    truth_net = copy.deepcopy(network).double()
    set_train_mode(truth_net, FROZEN)
    plain_net = copy.deepcopy(network)
    fused = FusedStemNetwork(plain_net, FROZEN)
    set_train_mode(plain_net, FROZEN)
    x = torch.randn(4, 3, 96, 96)
    truth_logits, truth = logits_and_gradients(truth_net, truth_net, x.double())
    plain_logits, plain = logits_and_gradients(plain_net, plain_net, x)
    fused_logits, fused_grads = logits_and_gradients(fused, plain_net, x)
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-4, rtol=1e-4)

    def error(grads: dict) -> float:
        return max(float((grads[n].double() - g).norm() / g.norm()) for n, g in truth.items())

    assert error(fused_grads) <= 3 * error(plain) + 1e-6


def test_fused_stem_trains_the_networks_own_parameters(network):
    """The optimizer holds `network`'s parameters; the fused view must not hide them behind copies."""
    fused = FusedStemNetwork(network, FROZEN)
    stem_ids = {id(p) for p in fused.stem.parameters()}
    trainable = [p for p in network.parameters() if p.requires_grad]
    assert trainable and not stem_ids & {id(p) for p in trainable}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.stem.modules())
    assert not any(p.requires_grad for p in fused.stem.parameters())


def test_fused_stem_needs_a_frozen_conv1():
    with pytest.raises(ValueError, match="no frozen stem"):
        FusedStemNetwork(build_model("none"), ("layer1",))


def test_fused_scoring_copy_matches_and_leaves_the_network_alone(network):
    network.train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    fused = fused_for_inference(network)
    assert network.training  # the argument keeps its mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = network.eval()(x)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4)
    after = network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_forward_follows_the_setting(network):
    assert isinstance(training_forward(network, TrainConfig()), FusedStemNetwork)
    assert training_forward(network, TrainConfig(fuse_bn=False)) is network
    assert training_forward(network, TrainConfig(frozen=())) is network


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-fuse-bn"], False), (["--fuse-bn"], True)])
def test_cli_switches_fusing(flag, expected, tmp_path):
    args = build_parser().parse_args(["run", "--out-dir", str(tmp_path), *flag])
    assert config_from_args(args).fuse_bn is expected
