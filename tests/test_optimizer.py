import pytest
import torch
from torch import nn

from retinanet_xla.config import OptimizerConfig, ScheduleConfig
from retinanet_xla.device.runtime import UpdateStyle
from retinanet_xla.training.optimizer import SGD, AdamW, LearningRateSchedule, build_optimizer, parameter_groups


def small_model():
    torch.manual_seed(0)
    # The ReLU between the convolution and BatchNorm gives the convolution's bias a real
    # gradient: straight into BatchNorm it would get rounding noise, which Adam scales up.
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("nesterov,decay_norm_and_bias", [(True, True), (False, False)])
def test_sgd_matches_torch_optim(nesterov, decay_norm_and_bias, in_place):
    ours_model, reference_model = small_model(), small_model()
    config = OptimizerConfig(momentum=0.9, nesterov=nesterov, weight_decay=0.01, weight_decay_norm_and_bias=decay_norm_and_bias)
    ours = SGD(parameter_groups(ours_model, decay_norm_and_bias), config, UpdateStyle(in_place=in_place))
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


@pytest.mark.parametrize("momentum,nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_sgd_in_place_is_the_traced_update_bit_for_bit(momentum, nesterov):
    """The eager (in-place) and the traced (out-of-place, copied) updates are the same
    operations in the same order: a resume across backends continues the same run."""
    models = {in_place: small_model() for in_place in (False, True)}
    config = OptimizerConfig(momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    optimizers = {
        in_place: SGD(parameter_groups(m, True), config, UpdateStyle(in_place=in_place)) for in_place, m in models.items()
    }
    for step in range(3):
        x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for in_place, model in models.items():
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizers[in_place].step(torch.tensor(0.05 * (step + 1)), [p.grad for p in optimizers[in_place].params])
    for a, b in zip(models[False].parameters(), models[True].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizers[False].momentum_buffers, optimizers[True].momentum_buffers):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_adamw_matches_torch_optim(decay_norm_and_bias):
    """Five steps at a changing rate, the last with one parameter left without a gradient
    (torch.optim leaves its state and step count alone), to 1e-6."""
    ours_model, reference_model = small_model(), small_model()
    config = OptimizerConfig(
        name="adamw", betas=[0.8, 0.99], eps=1e-6, weight_decay=0.05, weight_decay_norm_and_bias=decay_norm_and_bias
    )
    ours = build_optimizer(ours_model, config)
    assert isinstance(ours, AdamW)
    groups = parameter_groups(reference_model, decay_norm_and_bias)
    reference = torch.optim.AdamW(
        [{"params": groups["decay"], "weight_decay": 0.05}, {"params": groups["no_decay"], "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.8, 0.99),
        eps=1e-6,
    )
    for step, lr in enumerate([1e-3, 2e-3, 3e-3, 2e-3, 1e-3]):
        x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for model in (ours_model, reference_model):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            if step == 4:
                model[-1].bias.grad = None
        for group in reference.param_groups:
            group["lr"] = lr
        ours.step(torch.tensor(lr), [p.grad for p in ours.params])
        reference.step()
    for a, b in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(ours_model[0].weight, small_model()[0].weight)
    steps = {id(p): int(step) for p, step in zip(ours.params, ours.steps)}
    assert steps[id(ours_model[-1].bias)] == 4 and steps[id(ours_model[-1].weight)] == 5


def test_optimizer_state_of_another_optimizer_is_refused():
    model = small_model()
    sgd = build_optimizer(model, OptimizerConfig())
    adamw = build_optimizer(model, OptimizerConfig(name="adamw"))
    with pytest.raises(ValueError, match="train.optimizer.name=adamw"):
        adamw.load_state_dict(sgd.state_dict())
    saved = adamw.state_dict()
    saved["exp_avgs"] = saved["exp_avgs"][:-1]
    with pytest.raises(ValueError, match="optimizer state has 5 exp_avgs, the model needs 6"):
        adamw.load_state_dict(saved)


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
