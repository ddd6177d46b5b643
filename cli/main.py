"""The ``ifedicl`` command line: one app, one module per command, one error handler.

Errors a user can act on (:class:`~ifedicl.kernel.errors.IfediclError`) are printed as one
line (``error: ...``) with exit code 2; anything else is a bug and keeps its traceback.
Command modules import the heavy stack (torch, Ray, vLLM) only when their command runs.
"""

from __future__ import annotations

import typer

from ifedicl.cli.build_model import build_model_command
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


def main() -> None:
    """The one error handler: user errors exit 2 with one line, usage errors as click shows them."""
    import click

    try:
        app(standalone_mode=False)
    except IfediclError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    except click.exceptions.Exit as done:
        raise SystemExit(done.exit_code) from None
    except click.ClickException as err:
        err.show()
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
