"""``python -m d4d.fit RECIPE.yaml [--section.key value ...]``: train one stage from a recipe.

Built on Lightning's CLI (jsonargparse): ``model``, ``data``, ``trainer`` (with its callbacks and
logger) and the optimizer of each stage come from the recipe as ``class_path``/``init_args`` and can
be overridden on the command line (``--trainer.max_epochs 3``, ``--data.init_args.num_workers 0``).
Extra top-level keys:

* ``run_dir``: the run directory (default ``runs/<recipe name>``). Checkpoints go to
  ``<run_dir>/checkpoints``, the resolved recipe to ``<run_dir>/config.yaml``, wandb files to
  ``<run_dir>/wandb``. Nothing is written to the current directory.
* ``test_after_fit``: run the test loop on the best/last weights after training.

wandb is the default logger; it runs offline unless the user is logged in (``WANDB_API_KEY`` or a
``~/.netrc`` entry for api.wandb.ai) or ``WANDB_MODE`` says otherwise.

User mistakes (missing recipe, unknown key, bad value, missing data) end with one line on stderr
naming the file/key/value and exit status 2.
"""
from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path

from d4d.utils.cli_errors import summarize_argument_error
from d4d.utils.errors import UserError, exit_with_error

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

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            run_dir = cfg.run_dir or cfg.trainer.default_root_dir or os.path.join("runs", self.recipe_name)
            cfg.run_dir = run_dir
            cfg.trainer.default_root_dir = run_dir
            loggers = cfg.trainer.logger
            for entry in loggers if isinstance(loggers, list) else [loggers]:
                if getattr(entry, "class_path", "").endswith("WandbLogger"):
                    args = entry.init_args
                    if args.get("save_dir") in (None, "."):
                        args["save_dir"] = run_dir
                    if not args.get("offline") and not wandb_logged_in() and "WANDB_MODE" not in os.environ:
                        args["offline"] = True
            for entry in cfg.trainer.callbacks or []:
                if getattr(entry, "class_path", "").endswith("ModelCheckpoint"):
                    if entry.init_args.get("dirpath") is None:
                        entry.init_args["dirpath"] = os.path.join(run_dir, "checkpoints")

    return D4DCLI, RunDirConfig


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
    return D4DCLI(
        args=["--config", recipe, *(overrides or [])],
        run=False,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunDirConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        sys.exit(0 if argv else 2)
    recipe, rest = argv[0], argv[1:]
    if recipe.startswith("-"):
        exit_with_error(f"the first argument must be a recipe file, got {recipe!r}. {USAGE}", PROG)

    from jsonargparse import ArgumentError

    sys.argv = sys.argv[:1]  # the arguments reach LightningCLI through ``args``
    try:
        cli = build_cli(recipe, rest)
    except ArgumentError as exc:
        exit_with_error(f"{recipe}: {summarize_argument_error(str(exc))}", PROG)
    except UserError as exc:
        exit_with_error(str(exc) if str(exc).startswith(recipe) else f"{recipe}: {exc}", PROG)
    except (FileNotFoundError, ImportError) as exc:
        exit_with_error(f"{recipe}: {_one_line(exc)}", PROG)

    try:
        # Resolve the data paths before the trainer starts loggers, so that a wrong path does not
        # leave an empty wandb run behind. Lightning calls setup() again; it is cheap.
        if cli.datamodule is not None:
            cli.datamodule.setup("fit")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if cli.config.test_after_fit:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None)
    except UserError as exc:
        exit_with_error(f"{recipe}: {exc}", PROG)


if __name__ == "__main__":
    main()
