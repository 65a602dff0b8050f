"""The training loss, with and without teachers, against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.train import training_loss


def test_without_teachers_the_loss_is_cross_entropy():
    logits, labels = torch.tensor([[0.0, 0.0], [2.0, -1.0]]), torch.tensor([1, 0])
    assert training_loss(logits, labels, None, None, TrainConfig()) == pytest.approx(
        float(F.cross_entropy(logits, labels)))


def test_distillation_loss_hand_computed():
    # T = 2: teacher logits [0, 2 ln 3] soften to p = [1/4, 3/4]; the student [0, 0] says [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2); times T^2 = 4. Hard CE for label 1 = ln 2. Weight 0.5 mixes them.
    student, teacher, label = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2 * math.log(3)]]), torch.tensor([1])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    config = TrainConfig(distill_weight=0.5, distill_temperature=2.0)
    assert training_loss(student, label, teacher, None, config) == pytest.approx(0.5 * math.log(2) + 0.5 * 4 * kl)


def test_pure_distillation_is_zero_when_the_student_matches_the_teachers():
    logits = torch.tensor([[1.5, -0.5], [0.2, 0.9]])
    config = TrainConfig(distill_weight=1.0, distill_temperature=3.0)
    assert training_loss(logits, torch.tensor([0, 0]), logits.clone(), None, config) == pytest.approx(0.0, abs=1e-7)


def test_distillation_settings_are_checked():
    with pytest.raises(ValueError):
        TrainConfig(distill_weight=1.5)
    with pytest.raises(ValueError):
        TrainConfig(distill_temperature=0.0)
