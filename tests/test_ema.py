import pytest
import torch
from torch import nn

from retinanet_xla.training.ema import WeightAverage


def _device(kind: str) -> torch.device:
    if kind == "xla":
        import torch_xla

        return torch_xla.device()
    return torch.device(kind)


@pytest.mark.parametrize("kind", ["cpu", pytest.param("xla", marks=pytest.mark.xla)])
def test_weight_average_follows_the_warmup_rule_and_copies_integer_buffers(kind):
    device = _device(kind)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(device)
    average = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(device)
    average.load_state_dict(model.state_dict())
    ema = WeightAverage(model, average, decay=0.5)
    expected = model[0].weight.detach().cpu().clone()
    for n in (1, 2, 3, 30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        ema.update(torch.tensor(n, device=device))
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model[0].weight.detach().cpu()
        torch.testing.assert_close(average[0].weight.cpu(), expected)
    assert average[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 4
    assert not average[0].weight.requires_grad and not average.training


def test_weight_average_rejects_bad_decay():
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(nn.Linear(1, 1), nn.Linear(1, 1), 1.0)
