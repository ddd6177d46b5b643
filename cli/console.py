"""How every ``ifedicl`` command talks to its user: logging to stderr, errors as one line."""

from __future__ import annotations

import logging
import sys

try:  # typer 0.29 bundles its own click: its exceptions are not the click package's
    from typer._click.exceptions import BadParameter, ClickException, MissingParameter, NoArgsIsHelpError
except ImportError:  # an older typer, built on the click package
    from click.exceptions import BadParameter, ClickException, MissingParameter, NoArgsIsHelpError

__all__ = ["ClickException", "NoArgsIsHelpError", "one_line", "setup_logging", "usage_error_line"]


def setup_logging(verbose: bool) -> None:
    """``ifedicl`` loggers at INFO (a structured JSON line per round, drop, rejection) or, not ``verbose``,
    WARNING; chatty libraries at ERROR.

    The ``ifedicl`` logger's own level is what silences it: a logger with a level set hands its records to
    the root's handler whatever the root's level (``--no-verbose`` printed every round while it stayed INFO).
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("ifedicl").setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def one_line(message: str) -> str:
    """``message`` on one line: a user's terminal or log shows the whole error, not its first line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def usage_error_line(err: ClickException) -> str:
    """A usage error (missing option, bad value, unknown option or command) as one line naming the flag.

    Why not typer's own rendering: it prints a usage block, a hint and a boxed message (and typer 0.29's
    bundled click is not the ``click`` package, so catching ``click.ClickException`` never matched).
    """
    if isinstance(err, MissingParameter) and err.param is not None:
        envvar = f" (or set {err.param.envvar})" if isinstance(err.param.envvar, str) else ""
        return f"{_flag(err.param)}: required {err.param.param_type_name} missing{envvar}"
    if isinstance(err, BadParameter) and err.param is not None:
        return f"{_flag(err.param)}: {_bad_value(err)}"
    message = one_line(err.message if isinstance(err, BadParameter) else err.format_message()).rstrip(".")
    return message[:1].lower() + message[1:]


def _flag(param) -> str:
    """How the user spelled the parameter: its first flag (``--clients``), or an argument's name (``TASKS``)."""
    return param.name.upper() if param.param_type_name == "argument" else param.opts[0]


def _bad_value(err: BadParameter) -> str:
    """What was wrong with the value, naming it: typer 0.29 validates through pydantic, whose messages
    ("Input should be a valid integer, ...") do not say which value was refused."""
    errors = err.__cause__.errors() if hasattr(err.__cause__, "errors") else []
    if not errors:
        return one_line(err.message).rstrip(".")
    first = errors[0]
    if first["type"] == "value_error":  # a choice: "'x' is not one of 'mean', 'median'."
        return one_line(str(first.get("ctx", {}).get("error") or first["msg"])).rstrip(".")
    expected = first["msg"].split(",")[0].removeprefix("Input should be ")
    return f"{first['input']!r} is not {expected}"
