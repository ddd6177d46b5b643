"""The ``ifedicl`` command line: one app, one module per command, one error handler.

Errors a user can act on are printed as one line (``error: ...``) with exit code 2: the project's
own (:class:`~ifedicl.kernel.errors.IfediclError`) and every usage error (a missing option, a bad
value or choice, an unknown option or command: ``error: --clients: 'abc' is not a valid integer``).
Anything else is a bug and keeps its traceback. Command modules import the heavy stack (torch,
Ray, vLLM) only when their command runs.
"""

from __future__ import annotations

import importlib.metadata

import typer

from ifedicl.cli.build_model import build_model_command
from ifedicl.cli.console import ClickException, NoArgsIsHelpError, one_line, usage_error_line
from ifedicl.cli.demo import demo_command
from ifedicl.cli.evaluate import eval_command
from ifedicl.cli.federate import federate_command
from ifedicl.cli.models import models_app
from ifedicl.cli.predict import predict_command
from ifedicl.cli.recalibrate import recalibrate_command, recalibration_exporter_command
from ifedicl.cli.report import ablate_command, report_command
from ifedicl.cli.runs import publish_command, rollback_command, runs_command
from ifedicl.cli.serve import serve_command
from ifedicl.kernel.errors import IfediclError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Implicit Federated In-Context Learning.")
app.command("federate")(federate_command)
app.command("predict")(predict_command)
app.command("runs")(runs_command)
app.command("publish")(publish_command)
app.command("rollback")(rollback_command)
app.command("demo")(demo_command)
app.command("build-model")(build_model_command)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_command)
app.command("eval")(eval_command)
app.command("report")(report_command)
app.command("ablate")(ablate_command)
app.command("recalibrate")(recalibrate_command)
app.command("recalibration-exporter")(recalibration_exporter_command)
app.add_typer(models_app, name="models")


def _print_version(wanted: bool) -> None:
    """``--version``: the installed distribution's version, so it names what ``pip`` installed."""
    if wanted:
        typer.echo(f"ifedicl {importlib.metadata.version('ifedicl')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version and exit"
    ),
) -> None:
    """The options before the command (only ``--version``)."""


def _fail(message: str) -> None:
    """Exit 2 with ``error: <message>`` as the one line on stderr."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def main() -> None:
    """The one error handler: user and usage errors exit 2 with one line; ``--help`` and ``typer.Exit`` as asked."""
    try:
        exit_code = app(standalone_mode=False)  # help, --version and typer.Exit(n) return their exit code
    except IfediclError as err:
        _fail(one_line(str(err)))
    except NoArgsIsHelpError:  # ``ifedicl`` alone: typer printed the help while raising this
        raise SystemExit(2) from None
    except ClickException as err:
        _fail(usage_error_line(err))
    except typer.Abort:
        raise SystemExit(130) from None
    raise SystemExit(exit_code if isinstance(exit_code, int) else 0)


if __name__ == "__main__":
    main()
