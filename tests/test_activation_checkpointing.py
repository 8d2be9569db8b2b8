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


@pytest.mark.parametrize("recipe,block,count", [("dynamic", "WanTransformerBlock", 2),
                                                ("4dgen_224_linear", "CrossFrameBlock", 2)])
def test_recipe_key_and_command_line_flag_wrap_each_block_once(recipe, block, count, tmp_path, monkeypatch):
    """One name, applied once, from outside the model: the recipe's top-level key and the same flag on
    the command line must not wrap a block twice (a wrapper inside a wrapper recomputes twice)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from d4d.fit import build_cli
    from tests.conftest import REPO

    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(str(REPO / "recipes" / "debug" / f"{recipe}.yaml"),
                    ["--activation_checkpointing", f"[{block}]", "--run_dir", str(tmp_path / "run")])
    cli.model.configure_model()
    cli.model.configure_model()  # Lightning calls it again for test/predict: still once
    wrappers = [m for m in cli.model.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrappers) == count
    assert not any(isinstance(inner, CheckpointWrapper) for w in wrappers for inner in w._checkpoint_wrapped_module.modules())
    assert all(type(w._checkpoint_wrapped_module).__name__ == block for w in wrappers)
