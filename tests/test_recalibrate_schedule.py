"""The scheduled recalibration's pod script (deploy/k8s/recalibrate-rayjob.sh), run for real.

The script is the thing under test; only `kubectl` is a stand-in: a small script on PATH that plays
a RayJob's status sequence, one answer per `kubectl get`, and logs every call. Short poll intervals
come from the script's own settings (environment), as the CronJob sets them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
SCRIPT = DEPLOY / "recalibrate-rayjob.sh"
POLL_S = 0.2

# Plays the API server for one RayJob. create: prints the generated name (or fails if CREATE_FAILS);
# get ... {.status.message}: prints a message; get (status): the next line of $STATES (the last one
# repeats; NOTFOUND answers like a missing object); delete: succeeds. Every call is appended to $CALLS.
STAND_IN_KUBECTL = r"""#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$CALLS"
case "$1" in
  create)
    if [ -n "${CREATE_FAILS:-}" ]; then
      echo 'error: the server could not find the requested resource (post rayjobs.ray.io)' >&2; exit 1
    fi
    echo -n ifedicl-recalibrate-x7k2p ;;
  get)
    if [[ "$*" == *'{.status.message}'* ]]; then echo -n 'Job entrypoint command failed with exit code 2'; exit 0; fi
    n=$(grep -c '^get .*jobDeploymentStatus' "$CALLS")
    total=$(wc -l < "$STATES")
    line=$(sed -n "$(( n < total ? n : total ))p" "$STATES")
    if [ "$line" = NOTFOUND ]; then
      echo 'Error from server (NotFound): rayjobs.ray.io "ifedicl-recalibrate-x7k2p" not found' >&2; exit 1
    fi
    echo -n "$line" ;;
  delete) echo 'rayjob.ray.io "ifedicl-recalibrate-x7k2p" deleted' ;;
  *) echo "stand-in kubectl: unexpected call: $*" >&2; exit 2 ;;
esac
"""


def _run_script(tmp_path: Path, states: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(STAND_IN_KUBECTL)
    kubectl.chmod(0o755)
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states))
    calls = tmp_path / "calls"
    calls.touch()
    run_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STATES": str(tmp_path / "states"),
        "CALLS": str(calls),
        "RAYJOB_MANIFEST": str(tmp_path / "rayjob.yaml"),
        "POLL_SECONDS": str(POLL_S),
        **env,
    }
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=run_env, capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started, calls.read_text().splitlines()


def _status_polls(calls: list[str]) -> int:
    return sum(c.startswith("get ") and "jobDeploymentStatus" in c for c in calls)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: run .ci/install-system-deps.sh (Debian package `shellcheck`)"
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cronjob_ships_this_script_verbatim():
    docs = list(yaml.safe_load_all((DEPLOY / "recalibrate-cronjob.yaml").read_text()))
    config_map = next(d for d in docs if d["metadata"]["name"] == "ifedicl-recalibrate-rayjob")
    assert config_map["data"]["recalibrate-rayjob.sh"] == SCRIPT.read_text()
    cron = next(d for d in docs if d["kind"] == "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "/rayjob/recalibrate-rayjob.sh"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["WAIT_TIMEOUT_SECONDS"]) < job["activeDeadlineSeconds"]  # the script reports, not the deadline
    assert int(env["POLL_SECONDS"]) * int(env["MISSING_POLLS"]) <= 60  # a failure is reported within a minute
    rayjob = yaml.safe_load(config_map["data"]["rayjob.yaml"])
    assert "--kept-live-ok" in rayjob["spec"]["entrypoint"]  # a kept live run is a succeeded RayJob


def test_running_then_complete_returns_at_once_with_success(tmp_path):
    states = ["Initializing ", "Running RUNNING", "Running RUNNING", "Complete SUCCEEDED"]
    proc, waited, calls = _run_script(tmp_path, states)
    assert proc.returncode == 0, proc.stderr
    assert "created rayjob/ifedicl-recalibrate-x7k2p" in proc.stdout and "succeeded" in proc.stdout
    assert _status_polls(calls) == 4  # no look after Complete
    assert 3 * POLL_S <= waited < 3 * POLL_S + 3


@pytest.mark.parametrize(
    "final",
    ["Failed FAILED", "Complete FAILED", "Failed "],  # KubeRay >= 1.2; older KubeRay; failed before the job ran
)
def test_running_then_failed_fails_at_once_with_the_reason(tmp_path, final):
    proc, waited, calls = _run_script(tmp_path, ["Running RUNNING", "Running RUNNING", final])
    assert proc.returncode == 1
    assert "error: rayjob/ifedicl-recalibrate-x7k2p ended" in proc.stderr
    assert "exit code 2" in proc.stderr  # the RayJob's message is passed on
    assert _status_polls(calls) == 3
    assert 2 * POLL_S <= waited < 2 * POLL_S + 3


def test_never_created_fails_at_once(tmp_path):
    proc, waited, calls = _run_script(tmp_path, ["Running RUNNING"], CREATE_FAILS="1")
    assert proc.returncode == 1
    assert "error: could not create a RayJob" in proc.stderr and "nothing was run" in proc.stderr
    assert _status_polls(calls) == 0
    assert waited < 3


def test_a_rayjob_that_cannot_be_read_fails_after_the_missing_polls(tmp_path):
    proc, waited, calls = _run_script(tmp_path, ["NOTFOUND"], MISSING_POLLS="3")
    assert proc.returncode == 1
    assert "cannot be read (3 looks in a row)" in proc.stderr
    assert _status_polls(calls) == 3
    assert 2 * POLL_S <= waited < 2 * POLL_S + 3


def test_a_transient_read_error_is_not_a_failure(tmp_path):
    proc, _, calls = _run_script(tmp_path, ["Running RUNNING", "NOTFOUND", "Complete SUCCEEDED"], MISSING_POLLS="3")
    assert proc.returncode == 0, proc.stderr
    assert _status_polls(calls) == 3


def test_overrunning_the_wait_limit_fails_and_deletes_the_rayjob(tmp_path):
    proc, waited, calls = _run_script(tmp_path, ["Running RUNNING"], WAIT_TIMEOUT_SECONDS="1")
    assert proc.returncode == 1
    assert "still not finished after 1s; deleting it" in proc.stderr
    assert calls[-1].startswith("delete rayjob/ifedicl-recalibrate-x7k2p")
    assert 1 <= waited < 5  # at least the limit (bash's SECONDS ticks in whole seconds: up to 1 s more)
