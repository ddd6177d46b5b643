"""Usage errors through the installed ``ifedicl`` entry point: one line on stderr naming the flag, exit 2.

Each case runs the real console script in a fresh process (what a user's shell runs), and each fails
before any work: no model is loaded, no Ray started (the env-var case stops at the model's name).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ifedicl.devkit import DEMO_TASK_DIR

IFEDICL = Path(sys.executable).with_name("ifedicl")  # the console script pip installed beside this interpreter


def _ifedicl(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the installed ``ifedicl``; no ``IFEDICL_*`` of the caller leaks in, and help is wide enough
    that a choice list is not wrapped."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IFEDICL_")}
    return subprocess.run(
        [str(IFEDICL), *args], capture_output=True, text=True, timeout=120, env={**clean, "COLUMNS": "250", **env}
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


WRONG_INVOCATIONS = [
    (["federate", "--model", "m"], "--store: required option missing (or set IFEDICL_STORE)"),
    (["federate", "--model", "m", "--store", "s", "--clients", "abc"], "--clients: 'abc' is not a valid integer"),
    (["federate", "--local-epochs", "one"], "--local-epochs: 'one' is not a valid number"),
    (["federate", "--aggregator", "average"], "--aggregator: 'average' is not one of 'mean', 'trimmed-mean', 'median'"),
    (["federate", "--objective", "full"], "--objective: 'full' is not one of 'full-vocab', 'label-only'"),
    (["federate", "--vector-coding", "int4"], "--vector-coding: 'int4' is not one of 'float32', 'float16', 'int8'"),
    (["federate", "--weights", "copied"], "--weights: 'copied' is not one of 'shared', 'per-actor'"),
    (["eval", "task", "--dtype", "fp32"], "--dtype: 'fp32' is not one of 'float32', 'bfloat16', 'float16'"),
    (["eval", "task", "--client-test", "half"], "--client-test: 'half' is not one of 'full', 'split'"),
    (["eval", "t", "--model", "m", "--out", "o", "--client-test", "split", "--test-size", "4"],
     "--test-size must be >= --clients"),
    (["recalibrate", "--mode", "stage1"], "--mode: 'stage1' is not one of 'full', 'stage2'"),
    (["build-model", "--family", "mistral"], "--family: 'mistral' is not one of 'llama', 'qwen2', 'gemma3', 'gpt2'"),
    (["federate", "--bogus"], "no such option: --bogus"),
    (["federate", "--model"], "option '--model' requires an argument"),
    (["federate", "--publish=yes"], "option '--publish' does not take a value"),
    (["frobnicate"], "no such command 'frobnicate'"),
    (["eval", "--model", "m", "--out", "o"], "TASKS: required argument missing"),
    (["runs"], "--store: required option missing (or set IFEDICL_STORE)"),
    (["federate", "--model", "m", "--store", "s", "--dataset", "d", "--split", "a/b"], "--split: 'a/b' is not a split"),
    (["recalibrate", "--model", "m", "--store", "s", "--task-dir", "t", "--test-split", " "], "--test-split: ' '"),
    (["eval", "t", "--model", "m", "--out", "o", "--split", "x/y"], "--split: 'x/y' is not a split"),
    (["federate", "--model", "smollm2-135m", "--store", "s", "--task-dir", "t", "--revision", "main"],
     "--revision: applies to a hub model id (owner/name), not to 'smollm2-135m'"),
    (["serve", "--model", "acme/tiny", "--store", "s", "--revision", "a b"], "--revision: 'a b' is not a revision"),
    # what the default second-order round cannot do names the round that can
    (["federate", "--model", "smollm2-135m", "--store", "s", "--task-dir", str(DEMO_TASK_DIR), "--aggregator",
      "median"], "(got --aggregator median; with --stage2 local-steps it applies)"),
]


@pytest.mark.parametrize(("args", "expected"), WRONG_INVOCATIONS, ids=[" ".join(a) for a, _ in WRONG_INVOCATIONS])
def test_a_usage_error_is_one_line_naming_the_flag(args, expected):
    _assert_one_line_error(_ifedicl(*args), expected)


def test_model_and_store_from_the_environment(tmp_path):
    """IFEDICL_MODEL and IFEDICL_STORE stand for --model and --store: the unknown model is named in the
    project's one-line error, and nothing is written to the store."""
    store = tmp_path / "store"
    proc = _ifedicl(
        "federate", "--task-dir", str(DEMO_TASK_DIR), IFEDICL_MODEL="no-such-model", IFEDICL_STORE=str(store)
    )
    _assert_one_line_error(proc, "unknown model 'no-such-model'")
    assert not store.exists()


def test_version():
    proc = _ifedicl("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"ifedicl {importlib.metadata.version('ifedicl')}\n", "")


def test_help_lists_the_choices_and_the_environment_variables():
    proc = _ifedicl("federate", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for listed in (
        "<mean|trimmed-mean|median>",
        "<full-vocab|label-only>",
        "<float32|float16|int8>",
        "<shared|per-actor>",
        "<float32|bfloat16|float16>",
        "env var: IFEDICL_MODEL",
        "env var: IFEDICL_STORE",
    ):
        assert listed in proc.stdout, listed


def test_serve_help_is_plain_text_and_sends_the_rest_to_vllm():
    proc = _ifedicl("serve", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "``" not in proc.stdout  # RST markup was printed as is
    assert "vllm serve --help" in proc.stdout and "--max-slots" in proc.stdout


def test_no_verbose_silences_the_per_round_json_lines():
    """The logging ``ifedicl federate`` sets up (``setup_logging(verbose)``), then a round's line logged the
    way the driver logs it (``exchange.log_round``'s ``log_event``), in a fresh process each."""
    script = (
        "import sys; from ifedicl.cli.console import setup_logging; from ifedicl.federation_job.exchange import "
        "log_event; setup_logging(sys.argv[1] == 'verbose'); log_event('round', run='r', round=1)"
    )
    for verbosity, printed in (("verbose", True), ("no-verbose", False)):
        proc = subprocess.run([sys.executable, "-c", script, verbosity], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert ('"event": "round"' in proc.stderr) == printed, (verbosity, proc.stderr)


def test_the_choices_are_the_values_the_code_accepts():
    """Each flag's listed choices are exactly what the code behind it accepts: a choice the code lacks would
    fail after the run started, a value the code takes but --help omits would be refused."""
    from ifedicl.cli.build_model import Family
    from ifedicl.cli.recalibrate import Mode
    from ifedicl.devkit.tiny_model import FAMILIES
    from ifedicl.federation_job import options
    from ifedicl.federation_job.class_balanced import ESTIMATORS
    from ifedicl.federation_job.objective import OBJECTIVES
    from ifedicl.federation_job.recalibrate import MODES
    from ifedicl.federation_job.robust import AGGREGATORS
    from ifedicl.federation_job.second_order import CURVATURE_CHOICES, STAGE2_METHODS, STEP_CHECKS
    from ifedicl.federation_job.vector_coding import CODINGS
    from ifedicl.kernel.errors import IfediclError
    from ifedicl.kernel.modeling import DTYPES

    for choices, accepted in (
        (options.Aggregator, AGGREGATORS),
        (options.VectorCoding, CODINGS),
        (options.Objective, OBJECTIVES),
        (options.Stage1, ESTIMATORS),
        (options.Stage2, STAGE2_METHODS),
        (options.Curvature, CURVATURE_CHOICES),
        (options.StepCheck, STEP_CHECKS),
        (options.Dtype, tuple(DTYPES)),
        (Mode, MODES),
        (Family, FAMILIES),
    ):
        assert typing.get_args(choices) == tuple(accepted)
    for field, choices in (("weights", options.Weights), ("extract_dtype", options.Dtype)):
        for value in typing.get_args(choices):
            options.FederationOptions(**{field: value}).settings(0.5, 0).validate()
        with pytest.raises(IfediclError):
            options.FederationOptions(**{field: "other"}).settings(0.5, 0).validate()
