import pytest
import torch
from torch import nn

from retinanet_xla.config import OptimizerConfig, ScheduleConfig
from retinanet_xla.training.optimizer import SGD, LearningRateSchedule, parameter_groups


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("nesterov,decay_norm_and_bias", [(True, True), (False, False)])
def test_sgd_matches_torch_optim(nesterov, decay_norm_and_bias):
    ours_model, reference_model = small_model(), small_model()
    config = OptimizerConfig(momentum=0.9, nesterov=nesterov, weight_decay=0.01, weight_decay_norm_and_bias=decay_norm_and_bias)
    ours = SGD(parameter_groups(ours_model, decay_norm_and_bias), config)
    groups = parameter_groups(reference_model, decay_norm_and_bias)
    reference = torch.optim.SGD(
        [{"params": groups["decay"], "weight_decay": 0.01}, {"params": groups["no_decay"], "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=nesterov,
    )
    for step in range(4):
        x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for model in (ours_model, reference_model):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        ours.step(torch.tensor(0.1), [p.grad for p in ours.params])
        reference.step()
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b)


def test_norm_and_bias_exclusion():
    model = small_model()
    groups = parameter_groups(model, decay_norm_and_bias=False)
    assert len(groups["decay"]) == 2 and len(groups["no_decay"]) == 4  # conv/linear weights vs biases + BN affine
    assert len(parameter_groups(model, decay_norm_and_bias=True)["no_decay"]) == 0


def test_step_schedule_with_warmup():
    schedule = LearningRateSchedule(
        ScheduleConfig(base_lr=0.08, warmup_steps=500, warmup_start_lr=0.0067, kind="step", decay_steps=[1000, 2000]), 3000
    )
    steps = torch.tensor([0, 250, 500, 999, 1000, 1999, 2000, 2999])
    expected = [0.0067, 0.0067 + (0.08 - 0.0067) / 2, 0.08, 0.08, 0.008, 0.008, 0.0008, 0.0008]
    torch.testing.assert_close(schedule(steps), torch.tensor(expected), rtol=1e-5, atol=1e-8)


def test_cosine_schedule():
    schedule = LearningRateSchedule(ScheduleConfig(base_lr=1.0, warmup_steps=0, kind="cosine", final_lr_fraction=0.1), 100)
    values = schedule(torch.tensor([0, 50, 100]))
    torch.testing.assert_close(values, torch.tensor([1.0, 0.55, 0.1]))
