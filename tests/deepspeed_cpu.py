"""TEST SHIM, never part of the package: ``python -m tests.deepspeed_cpu RECIPE [d4d.fit args]`` runs
``d4d.fit`` unchanged, with Lightning's own ``DeepSpeedStrategy`` (and so d4d's subclass of it)
allowed on DeepSpeed's CPU accelerator, so that the real GPU code path (config resolution, bf16
casting of the module and the batch, ZeRO optimizer, engine step, checkpoint save/load) runs here.

Lightning refuses non-CUDA accelerators in exactly three places, each replaced here and nowhere else:

* ``DeepSpeedStrategy.setup_environment`` raises for a non-CUDA accelerator: the DDP parent's runs instead;
* ``setup_distributed`` calls ``_validate_device_index_selection`` (CUDA device indices): skipped;
* ``deepspeed.initialize`` gets ``device_rank=root_device.index``, which is ``None`` on a CPU: ``-1``.

``DS_ACCELERATOR=cpu`` makes DeepSpeed pick its CPU accelerator, and the process group is gloo
(Lightning's default for CPU devices). Lightning's DDP launcher starts ranks 1..N-1 by re-running this
command line, so every rank gets the same shim.
"""
from __future__ import annotations

import os
import sys

os.environ["DS_ACCELERATOR"] = "cpu"
os.environ.setdefault("OMP_NUM_THREADS", "1")


def install() -> None:
    import deepspeed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
    from lightning.fabric.utilities.seed import reset_seed

    if getattr(DeepSpeedStrategy, "_d4d_cpu_shim", False):
        return

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    DeepSpeedStrategy.setup_environment = setup_environment
    DeepSpeedStrategy.setup_distributed = setup_distributed
    DeepSpeedStrategy._d4d_cpu_shim = True

    initialize = deepspeed.initialize

    def initialize_on_cpu(*args, **kwargs):
        ns = kwargs.get("args")
        if ns is not None and getattr(ns, "device_rank", 0) is None:
            ns.device_rank = -1
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_on_cpu


if __name__ == "__main__":
    install()
    from d4d.fit import main

    main(sys.argv[1:])
