import pytest
import torch
import torch.nn as nn

from d4d.utils.activation_checkpointing import apply_activation_checkpointing, count_checkpointed
from d4d.utils.errors import UserError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x)) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _grads(model, x):
    model.zero_grad()
    model(x).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("targets", [["Block"], ["blocks.*"]])
def test_same_outputs_grads_and_state_dict(targets):
    torch.manual_seed(0)
    ref = Net()
    net = Net()
    net.load_state_dict(ref.state_dict())
    assert apply_activation_checkpointing(net, targets) == 3
    assert count_checkpointed(net) == 3
    x = torch.randn(4, 8)
    for a, b in zip(_grads(ref, x), _grads(net, x)):
        torch.testing.assert_close(a, b)
    assert set(net.state_dict()) == set(ref.state_dict())
    Net().load_state_dict(net.state_dict())


def test_unknown_target_is_an_error():
    with pytest.raises(UserError, match="Blok"):
        apply_activation_checkpointing(Net(), ["Blok"])


def test_empty_targets_do_nothing():
    net = Net()
    assert apply_activation_checkpointing(net, []) == 0
    assert count_checkpointed(net) == 0
