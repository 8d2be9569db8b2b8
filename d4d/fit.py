"""``python -m d4d.fit RECIPE.yaml [--section.key value ...]``: train one stage from a recipe.

Built on Lightning's CLI (jsonargparse): ``model``, ``data``, ``trainer`` (with its callbacks and
logger) and the optimizer of each stage come from the recipe as ``class_path``/``init_args`` and can
be overridden on the command line (``--trainer.max_epochs 3``, ``--data.init_args.num_workers 0``).
Extra top-level keys:

* ``run_dir``: the run directory (default ``runs/<recipe name>``). Checkpoints go to
  ``<run_dir>/checkpoints``, the resolved recipe to ``<run_dir>/config.yaml``, wandb files to
  ``<run_dir>/wandb``. Nothing is written to the current directory.
* ``test_after_fit``: run the test loop on the best/last weights after training.
* ``resume``: ``none`` (default), ``auto`` (the newest complete checkpoint in
  ``<run_dir>/checkpoints`` or a Slurm requeue checkpoint ``<run_dir>/hpc_ckpt_*.ckpt``; none found:
  start fresh) or a checkpoint path. Restores weights, optimizer, schedulers, step, RNG states and
  the position in the training data stream; the wandb run continues (its id is kept in
  ``<run_dir>/wandb_run_id``).
* ``init_from``: a checkpoint whose weights initialise the model (non-strict; missing and unexpected
  keys are reported); nothing else is restored. Ignored when ``resume`` finds a checkpoint.
* ``checkpoint_every_n_steps`` (default 1000, null: off) and ``keep_last_k`` (default 3): atomic
  step checkpoints ``checkpoints/step{step:08d}.ckpt``.
* ``deepspeed``: ``zero1``, ``zero2``, ``zero3``, ``zero3_offload`` (``configs/deepspeed/*.json``), a
  JSON path, or ``none``: the one way to select DeepSpeed (d4d's subclass of Lightning's strategy).
  DDP: ``--trainer.strategy ddp``. A command-line ``--deepspeed`` or ``--trainer.strategy`` replaces
  the recipe's other; Lightning's ``deepspeed_stage_N`` strategy names are refused with the preset to use.
* ``activation_checkpointing``: block class names or dotted-name globs wrapped with activation
  checkpointing from outside the model, once, at ``configure_model`` time (the one name for it;
  the shipped recipes set it).
* ``ema``: ``{decay: 0.9999, every_n_steps: 1, start_step: 0, device: null}`` (null, the default: off):
  an exponential moving average of the trainable weights of the diffusion stages (static, dynamic),
  kept in float32 on rank 0, saved in every checkpoint (``ema_state_dict``) and restored on resume;
  sampling uses it (``--weights ema|raw``). Works with DDP and DeepSpeed ZeRO-1/2/3
  (:mod:`d4d.callbacks.ema`).

Precision, accumulation and clipping are trainer keys: ``--trainer.precision bf16-mixed``,
``--trainer.accumulate_grad_batches 4``, ``--trainer.gradient_clip_val 1.0``. See docs/cluster.md.

wandb is the default logger; it runs offline unless the user is logged in (``WANDB_API_KEY`` or a
``~/.netrc`` entry for api.wandb.ai) or ``WANDB_MODE`` says otherwise.

User mistakes (missing recipe, unknown key, bad value, missing data) end with one line on stderr
naming the file/key/value and exit status 2.
"""
from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path

from d4d.utils.cli_errors import summarize_argument_error
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.logging import get_logger, global_rank

log = get_logger(__name__)

PROG = "d4d.fit"
USAGE = "usage: python -m d4d.fit RECIPE.yaml [--section.key value ...] [--print_config]"


def wandb_logged_in() -> bool:
    """True when wandb has credentials (so online logging is possible)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def in_slurm_batch_job() -> bool:
    """True inside an sbatch job's ``srun`` tasks (Lightning's own test: not an interactive shell)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _check_recipe(path: str) -> None:
    import yaml

    recipe = Path(path)
    if not recipe.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        content = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections, got {type(content).__name__}")


def _build_cli_class():
    """Import Lightning lazily so that ``--help`` and argument errors stay fast."""
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    class RunDirConfig(SaveConfigCallback):
        """Saves the resolved recipe as ``<run_dir>/config.yaml`` (Lightning's default is the
        logger's directory, which for wandb is not the run directory)."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved or not trainer.is_global_zero:
                return
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, run_dir / self.config_filename,
                             overwrite=True, multifile=False)
            self.already_saved = True

    class D4DCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str | None, default=None,
                                help="Run directory (default: runs/<recipe name>).")
            parser.add_argument("--test_after_fit", type=bool, default=False,
                                help="Run the test loop after fitting.")
            parser.add_argument("--resume", type=str, default="none",
                                help="auto | none | PATH: continue a run (weights, optimizer, step, data position).")
            parser.add_argument("--init_from", type=str | None, default=None,
                                help="Checkpoint whose weights initialise the model (weights only, non-strict).")
            parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=1000,
                                help="Atomic step checkpoints every N optimizer steps (null: off).")
            parser.add_argument("--keep_last_k", type=int, default=3,
                                help="Step checkpoints kept (the newest k; -1: all).")
            parser.add_argument("--deepspeed", type=str | None, default=None,
                                help="DeepSpeed preset (zero1, zero2, zero3, zero3_offload), config JSON path, "
                                     "or none.")
            parser.add_argument("--activation_checkpointing", type=list[str] | None, default=None,
                                help="Block class names / dotted-name globs to wrap with activation checkpointing.")
            from d4d.callbacks.ema import EMAOptions

            parser.add_argument("--ema", type=EMAOptions | None, default=None,
                                help="EMA of the trainable weights (diffusion stages): {decay, every_n_steps, "
                                     "start_step, device}; null: off.")

        def before_instantiate_classes(self) -> None:
            from d4d.utils.validate_fit import check_trainer_and_data_numbers

            cfg = self.config
            check_trainer_and_data_numbers(cfg)  # range checks LightningCLI's types do not make
            run_dir = cfg.run_dir or cfg.trainer.default_root_dir or os.path.join("runs", self.recipe_name)
            cfg.run_dir = run_dir
            cfg.trainer.default_root_dir = run_dir
            from d4d.utils.resume import check_resume_stage, remove_stale_temporaries, resolve_resume, wandb_run_id
            from d4d.utils.run_lock import RunDirLock

            if global_rank() == 0:  # one run per directory; the other ranks belong to this one
                self.run_lock = RunDirLock(run_dir).acquire()
                remove_stale_temporaries(run_dir)
            self.resume_ckpt = resolve_resume(cfg.resume, run_dir)
            if self.resume_ckpt:  # before any logger exists: a wrong checkpoint leaves no wandb run behind
                check_resume_stage(self.resume_ckpt, cfg.model.class_path)
            requeued = bool(os.environ.get("SLURM_JOB_ID")) and any(Path(run_dir).glob("hpc_ckpt_*.ckpt"))
            self._configure_strategy(cfg, run_dir)
            loggers = cfg.trainer.logger
            for entry in loggers if isinstance(loggers, list) else [loggers]:
                if getattr(entry, "class_path", "").endswith("WandbLogger"):
                    args = entry.init_args
                    if args.get("save_dir") in (None, "."):
                        args["save_dir"] = run_dir
                    if not args.get("offline") and not wandb_logged_in() and "WANDB_MODE" not in os.environ:
                        args["offline"] = True
                    if not args.get("id"):  # a resumed (or Slurm-requeued) run continues its wandb run
                        resuming = self.resume_ckpt is not None or requeued
                        args["id"] = wandb_run_id(run_dir, resuming, write=global_rank() == 0)
                        args["resume"] = "allow"
            for entry in cfg.trainer.callbacks or []:
                if getattr(entry, "class_path", "").endswith("ModelCheckpoint"):
                    if entry.init_args.get("dirpath") is None:
                        entry.init_args["dirpath"] = os.path.join(run_dir, "checkpoints")

        def _configure_strategy(self, cfg, run_dir: str) -> None:
            """DeepSpeed preset, atomic checkpoint IO, step checkpoints and resume state."""
            from jsonargparse import Namespace

            trainer = cfg.trainer
            deepspeed = select_strategy(cfg, self.cli_args)
            if deepspeed:
                from d4d.callbacks.strategies import resolve_deepspeed_config

                trainer.strategy = Namespace(class_path="d4d.callbacks.strategies.AtomicDeepSpeedStrategy",
                                             init_args=Namespace(config=resolve_deepspeed_config(deepspeed)))
            else:
                plugins = trainer.plugins if isinstance(trainer.plugins, list) else (
                    [] if trainer.plugins is None else [trainer.plugins])
                if not any("CheckpointIO" in str(getattr(p, "class_path", p)) for p in plugins):
                    plugins.append(Namespace(class_path="d4d.callbacks.AtomicCheckpointIO", init_args=Namespace()))
                trainer.plugins = plugins
            callbacks = list(trainer.callbacks or [])
            callbacks.append(Namespace(class_path="d4d.callbacks.ResumeState", init_args=Namespace()))
            if in_slurm_batch_job():  # checkpoint at a step boundary and requeue on SIGUSR1
                plugins = trainer.plugins if isinstance(trainer.plugins, list) else (
                    [] if trainer.plugins is None else [trainer.plugins])
                plugins.append(Namespace(class_path="lightning.fabric.plugins.environments.SLURMEnvironment",
                                         init_args=Namespace(auto_requeue=False)))
                trainer.plugins = plugins
                callbacks.append(Namespace(class_path="d4d.callbacks.preemption.SlurmRequeue", init_args=Namespace()))
            if cfg.checkpoint_every_n_steps is not None:
                if cfg.checkpoint_every_n_steps < 1 or (cfg.keep_last_k < 1 and cfg.keep_last_k != -1):
                    raise UserError(f"checkpoint_every_n_steps ({cfg.checkpoint_every_n_steps}) must be >= 1 "
                                    f"and keep_last_k ({cfg.keep_last_k}) >= 1 or -1")
                callbacks.append(Namespace(class_path="d4d.callbacks.StepCheckpoint", init_args=Namespace(
                    dirpath=os.path.join(run_dir, "checkpoints"), every_n_steps=cfg.checkpoint_every_n_steps,
                    keep_last=cfg.keep_last_k)))
            # the ema key is the one way to add it (a config.yaml saved by d4d.fit lists it in both places)
            callbacks = [c for c in callbacks if getattr(c, "class_path", None) != "d4d.callbacks.ema.EMA"]
            if cfg.ema is not None:
                from d4d.callbacks.ema import check_options

                check_options(cfg.ema)
                callbacks.append(Namespace(class_path="d4d.callbacks.ema.EMA", init_args=Namespace(
                    **{k: getattr(cfg.ema, k) for k in ("decay", "every_n_steps", "start_step", "device")})))
            trainer.callbacks = callbacks

    return D4DCLI, RunDirConfig


def _given_on_command_line(args: list[str], key: str) -> bool:
    return any(a == f"--{key}" or a.startswith((f"--{key}=", f"--{key}.")) for a in args)


def _strategy_name(strategy) -> str | None:
    """A string strategy as it is, a ``class_path`` strategy by its class path; None for auto."""
    if strategy is None:
        return None
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", None) or str(strategy)
    return None if name == "auto" else name


def select_strategy(cfg, cli_args: list[str]) -> str | None:
    """The one rule for choosing DeepSpeed: the ``deepspeed`` key (``zero1``/``zero2``/``zero3``/
    ``zero3_offload``/JSON; ``none`` or null: off). Returns the DeepSpeed spec to use, or None.

    * ``trainer.strategy`` naming Lightning's DeepSpeed (``deepspeed_stage_1``, a DeepSpeedStrategy
      class) is refused with the preset to use instead (it would bypass d4d's DeepSpeed strategy).
    * ``deepspeed`` and a non-auto ``trainer.strategy`` together: the one given on the command line
      wins over the recipe's other (``recipes/dynamic.yaml --trainer.strategy ddp`` runs DDP); both
      from the same place is a conflict.
    """
    from d4d.callbacks.strategies import LIGHTNING_DEEPSPEED_NAMES

    trainer = cfg.trainer
    deepspeed = cfg.deepspeed if cfg.deepspeed not in (None, "", "none", "null") else None
    strategy = _strategy_name(trainer.strategy)
    if strategy and "deepspeed" in strategy.lower() and not strategy.endswith("AtomicDeepSpeedStrategy"):
        preset = LIGHTNING_DEEPSPEED_NAMES.get(strategy)
        hint = f"--deepspeed {preset}" if preset else "--deepspeed with a config JSON"
        raise UserError(f"trainer.strategy: {strategy!r} bypasses d4d's DeepSpeed strategy (atomic checkpoints, "
                        f"micro batch from the data, fp32 cameras); use {hint} (recipe key deepspeed) instead")
    if strategy and strategy.endswith("AtomicDeepSpeedStrategy"):
        if not deepspeed:
            raise UserError("trainer.strategy: choose DeepSpeed with the deepspeed key (--deepspeed zero2, ...), "
                            "not by class path")
        trainer.strategy, strategy = "auto", None  # a config.yaml saved by d4d.fit: the deepspeed key rebuilds it
    if deepspeed and strategy:
        ds_cli = _given_on_command_line(cli_args, "deepspeed")
        st_cli = _given_on_command_line(cli_args, "trainer.strategy")
        if ds_cli == st_cli:
            raise UserError(f"deepspeed: {deepspeed!r} conflicts with trainer.strategy {strategy!r}; "
                            "give one of them (deepspeed: none turns DeepSpeed off)")
        if st_cli:
            log.info("trainer.strategy %s from the command line replaces the recipe's deepspeed %s", strategy, deepspeed)
            return None
        log.info("deepspeed %s from the command line replaces the recipe's trainer.strategy %s", deepspeed, strategy)
        trainer.strategy = "auto"
    return deepspeed


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def build_cli(recipe: str, overrides: list[str] | None = None):
    """Parse ``recipe`` plus command-line ``overrides`` and instantiate model, data and trainer.

    Raises ``jsonargparse.ArgumentError`` for unknown keys and bad values, :class:`UserError` for
    other user mistakes (missing recipe, invalid YAML, unloadable weights).
    """
    _check_recipe(recipe)
    D4DCLI, RunDirConfig = _build_cli_class()
    D4DCLI.recipe_name = Path(recipe).stem
    D4DCLI.cli_args = list(overrides or [])
    with warnings.catch_warnings():
        # sys.argv is kept for Lightning's re-launch of ranks 1..N-1; the arguments come through args
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = D4DCLI(
            args=["--config", recipe, *(overrides or [])],
            run=False,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunDirConfig,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
            auto_configure_optimizers=False,
        )
    from d4d.callbacks.configure import prepare_at_configure

    if cli.config.ema is not None:
        from d4d.callbacks.ema import STAGES

        if getattr(cli.model, "stage", None) not in STAGES:
            raise UserError(f"ema: only the diffusion stages ({', '.join(STAGES)}) take it, not "
                            f"{type(cli.model).__name__}; remove the ema key")
    init_from = cli.config.init_from
    if init_from and cli.resume_ckpt:
        log.info("resuming from %s: init_from %s is not applied", cli.resume_ckpt, init_from)
        init_from = None
    if init_from and not os.path.exists(init_from):
        raise UserError(f"init_from: {init_from!r} does not exist")
    prepare_at_configure(cli.model, init_from, cli.config.activation_checkpointing)
    return cli


def _user_error_cause(exc: BaseException) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    from d4d.utils.run_lock import release_held_locks

    try:
        _main(argv)
    finally:
        release_held_locks()


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        sys.exit(0 if argv else 2)
    recipe, rest = argv[0], argv[1:]
    if recipe.startswith("-"):
        exit_with_error(f"the first argument must be a recipe file, got {recipe!r}. {USAGE}", PROG)

    from jsonargparse import ArgumentError

    # sys.argv stays as it is: Lightning starts ranks 1..N-1 of a one-node multi-device run by
    # running this process's command line again, and the arguments reach LightningCLI through ``args``.
    try:
        cli = build_cli(recipe, rest)
    except ArgumentError as exc:
        exit_with_error(f"{recipe}: {summarize_argument_error(str(exc))}", PROG)
    except UserError as exc:
        exit_with_error(str(exc) if str(exc).startswith(recipe) else f"{recipe}: {exc}", PROG)
    except (FileNotFoundError, ImportError) as exc:
        exit_with_error(f"{recipe}: {_one_line(exc)}", PROG)
    except (ValueError, TypeError) as exc:
        # jsonargparse wraps what a class raises while it is instantiated; a UserError inside is
        # still the user's mistake and gets its one line.
        cause = _user_error_cause(exc)
        if cause is None:
            raise
        exit_with_error(str(cause) if str(cause).startswith(recipe) else f"{recipe}: {cause}", PROG)

    try:
        # Resolve the data paths before the trainer starts loggers, so that a wrong path does not
        # leave an empty wandb run behind. Lightning calls setup() again; it is cheap.
        if cli.datamodule is not None:
            cli.datamodule.trainer = cli.trainer  # its world size: checks that depend on it fail here, once
            cli.datamodule.setup("fit")
        if cli.resume_ckpt:
            log.info("resuming from %s", cli.resume_ckpt)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_ckpt)
        preempted = any(getattr(cb, "preempted", False) for cb in cli.trainer.callbacks)
        if preempted:
            log.info("stopped for preemption; the requeued job resumes from the hpc checkpoint")
        elif cli.config.test_after_fit:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None)
    except UserError as exc:
        exit_with_error(f"{recipe}: {exc}", PROG)


if __name__ == "__main__":
    main()
