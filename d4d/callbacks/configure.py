"""What ``d4d.fit`` does to a stage's module at ``configure_model`` time, from top-level recipe keys:
``init_from`` (load weights only) and ``activation_checkpointing`` (wrap named blocks). Both run
after the module's own ``configure_model`` (so a stage that builds its network lazily has built it)
and before the strategy wraps the module in DDP/DeepSpeed; weights are loaded before wrapping."""
from __future__ import annotations

import contextlib
import sys
import types

from d4d.utils.activation_checkpointing import apply_activation_checkpointing
from d4d.utils.logging import get_logger
from d4d.utils.resume import init_weights_from

log = get_logger(__name__)


@contextlib.contextmanager
def outside_zero_init():
    """Suspend DeepSpeed's ``zero.Init`` patching (Lightning runs ``configure_model`` inside it under
    ZeRO-3): the checkpoint wrappers own no parameters, and ``zero.Init``'s ``__init__`` hook probes
    each new module with ``hasattr`` before ``nn.Module.__init__`` has run, which sends torch's
    ``CheckpointWrapper.__getattr__`` into endless recursion."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = zero is not None and zero.top_level_context is not None
    if active:
        zero.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            zero.restore_init_context()


def prepare_at_configure(module, init_from: str | None = None, checkpointing: list[str] | None = None) -> None:
    """Chain ``init_from`` loading (:func:`d4d.utils.resume.init_weights_from`) and
    :func:`apply_activation_checkpointing` (``checkpointing`` targets) after ``module.configure_model``.
    Each is applied once, also when Lightning calls ``configure_model`` again for ``test``. Errors
    (unreadable weights, a target that matches no block) are UserErrors raised when applied."""
    targets = [t for t in (checkpointing or []) if t]
    if not targets and not init_from:
        return
    own = module.configure_model

    def configure_model(self) -> None:
        own()
        if getattr(self, "_d4d_prepared", False):
            return
        if init_from:
            init_weights_from(self, init_from)
        if targets:
            with outside_zero_init():
                count = apply_activation_checkpointing(self, targets)
            log.info("activation checkpointing: wrapped %d blocks matching %s", count, targets)
        self._d4d_prepared = True

    module.configure_model = types.MethodType(configure_model, module)
