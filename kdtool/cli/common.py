"""Shared pieces of the command line: error handling, common options, recipe loading.

Errors from the library (`KdtoolError`) become one line on stderr and an exit code (2 bad input,
1 failed check); ``--debug`` (or ``KDTOOL_DEBUG=1``) shows the full traceback instead.

Only Click and kdtool.errors are imported here: the stages (and the recipe schema) are imported by
the command that runs, so ``kdtool --help`` answers without importing torch or pydantic.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kdtool.errors import CheckFailed, Interrupted, KdtoolError

if TYPE_CHECKING:
    from kdtool.recipe import Recipe

LOGGER = "kdtool"  # the library logs under kdtool.<module>; the CLI shows those records on stderr


def _debug_enabled(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if ctx.meta.get("kdtool.debug"):
            return True
        ctx = ctx.parent
    return os.environ.get("KDTOOL_DEBUG", "") not in ("", "0")


def _printable(message: str, keep_newlines: bool) -> str:
    """`message` with control characters escaped (a recipe key may hold a "\\r").

    Bad input is reported on one line; a failed check may keep its line breaks for a table of what failed.
    """
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else repr(c)[1:-1] for c in message)


def is_main_process() -> bool:
    """Whether this is the first process of a multi-process launch (torchrun / accelerate launch set RANK), or alone."""
    return os.environ.get("RANK", "0") == "0"


def handle_errors(command):
    """Turn library errors (and OS errors on user paths) into one-line messages with exit codes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return command(*args, **kwargs)
        except (KdtoolError, OSError) as exc:
            if _debug_enabled(ctx):
                raise
            code = getattr(exc, "exit_code", 2)
            if isinstance(exc, Interrupted) and "RANK" in os.environ:  # one of several launched processes
                # Saved and stopped: the launcher's SIGTERM while this process exits must not turn 143 into a kill.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if not is_main_process():
                    ctx.exit(code)  # every rank stopped at the same step with the same message: the main one says it
            message = str(exc) if isinstance(exc, KdtoolError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            click.secho(f"Error: {_printable(message, keep_newlines=isinstance(exc, CheckFailed))}", fg="red", err=True)
            ctx.exit(code)
        except KeyboardInterrupt:  # SIGINT outside training, where nothing is saved on the way out
            if _debug_enabled(ctx):
                raise
            click.secho("Error: interrupted by SIGINT", fg="red", err=True)
            ctx.exit(130)

    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (Click's test runner swaps it per call)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(debug: bool = False) -> None:
    """Show the library's log records (messages that are not results) on stderr, one plain line each;
    DEBUG records too with --debug. Idempotent: the handler is installed once."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())


# Asking for nothing shows the help (Click >= 8.2 raises this usage error for it): not an error to shorten.
_HELP_REQUESTS = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _UsageLine(click.ClickException):
    """A Click parameter or usage error, shown as one line (no usage block) with exit code 2."""

    exit_code = 2


def _one_line_usage(error: click.UsageError) -> click.UsageError | _UsageLine:
    """`error` as one line naming the command, with where to look for help."""
    if isinstance(error, _HELP_REQUESTS):
        return error
    message = " ".join(line.strip() for line in error.format_message().splitlines() if line.strip())
    where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
    return _UsageLine(_printable(message.rstrip(".") + where, keep_newlines=False))


class OneLineErrors(click.Group):
    """A command group whose parameter errors (bad option values, unknown options, missing arguments), for
    itself and every command under it, are one line and exit 2, like every other bad input."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _one_line_usage(error) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a sub-command's parameters, parsed when it is invoked
            raise _one_line_usage(error) from None


def _set_debug(ctx: click.Context, _param, value: bool):
    if value:
        ctx.meta["kdtool.debug"] = True
    configure_logging(_debug_enabled(ctx))
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show full tracebacks instead of one-line errors.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe value, e.g. --set train.epochs=5 (repeatable).")


def recipe_options(command):
    """Options shared by every command that reads a recipe."""
    for option in reversed([
        click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path)),
        set_option,
        click.option("--seed", metavar="INT", default=None, help="Override the recipe's seed (0 to 2^32 - 1)."),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Run directory (default: runs/<recipe name>)."),
        click.option("--resume", is_flag=True, help="Continue the run in the run directory from its last checkpoint."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run directory."),
        click.option("--progress/--no-progress", default=True, help="Show progress bars."),
        debug_option,
    ]):
        command = option(command)
    return command


def parse_seed(text: str | None) -> int | None:
    """The --seed option as an int, or a one-line KdtoolError (Click's own type error is a usage block)."""
    from kdtool.recipe import MAX_SEED

    if text is None:
        return None
    shown = text if len(text) <= 40 else text[:37] + "..."
    try:
        seed = int(text, 10)
    except ValueError:
        raise KdtoolError(f"--seed: {shown!r} is not a valid integer (0 to {MAX_SEED})") from None
    if seed < 0:
        raise KdtoolError(f"--seed: input should be greater than or equal to 0 (got {shown})")
    if seed > MAX_SEED:
        raise KdtoolError(f"--seed: input should be less than or equal to {MAX_SEED} (got {shown})")
    return seed


def read_recipe(recipe_path: Path, overrides, seed: str | None) -> Recipe:
    """The recipe with `--set` overrides, then `--seed`, applied."""
    from kdtool.recipe import load_recipe

    seed = parse_seed(seed)
    overrides = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
    return load_recipe(recipe_path, overrides)
