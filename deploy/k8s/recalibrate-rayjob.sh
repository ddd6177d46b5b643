#!/usr/bin/env bash
# The scheduled recalibration's pod: create one RayJob and report its outcome as soon as it has one.
#
# Why a poll and not `kubectl wait`: a RayJob that fails never becomes Complete, and `kubectl wait`
# cannot wait for "Complete or Failed"; waiting for Complete alone reported a failure hours late.
# Exit 0 when the Ray job SUCCEEDED: `ifedicl recalibrate --kept-live-ok` exits 0 for a published
# candidate and for a kept live run alike (the decision is in the job's log, in the store's
# `recalibrations` table and in ifedicl_recalibration_attempts_total). Exit 1 otherwise: the RayJob
# failed (KubeRay >= 1.2 says Failed; older versions say Complete with jobStatus FAILED), could not be
# created, disappeared, or outlived WAIT_TIMEOUT_SECONDS (then it is deleted, so that the next
# scheduled run does not overlap it).
#
# Settings (environment): RAYJOB_MANIFEST (the RayJob to create), POLL_SECONDS (how often to look),
# WAIT_TIMEOUT_SECONDS (give up; keep it below the CronJob's activeDeadlineSeconds), MISSING_POLLS
# (how many failed looks in a row mean the RayJob is gone).
set -euo pipefail

manifest=${RAYJOB_MANIFEST:-/rayjob/rayjob.yaml}
poll_s=${POLL_SECONDS:-10}
timeout_s=${WAIT_TIMEOUT_SECONDS:-23000}
missing_polls=${MISSING_POLLS:-6}

if ! name=$(kubectl create -f "$manifest" -o jsonpath='{.metadata.name}'); then
  echo "error: could not create a RayJob from $manifest; nothing was run" >&2
  exit 1
fi
if [ -z "$name" ]; then
  echo "error: kubectl create -f $manifest returned no RayJob name; nothing to wait for" >&2
  exit 1
fi
echo "created rayjob/$name"

start=$SECONDS
missing=0
last=""
while :; do
  # "<jobDeploymentStatus> <jobStatus>", e.g. "Running RUNNING", "Complete SUCCEEDED", "Failed FAILED"
  if state=$(kubectl get "rayjob/$name" -o jsonpath='{.status.jobDeploymentStatus} {.status.jobStatus}'); then
    missing=0
    deployment=${state%% *}
    job=${state#* }
    if [ "$state" != "$last" ]; then
      echo "rayjob/$name: ${deployment:-Pending} ${job:-}"
      last=$state
    fi
    case "$deployment" in
      Complete | Failed)
        if [ "$deployment" = Complete ] && [ "$job" = SUCCEEDED ]; then
          echo "rayjob/$name succeeded after $((SECONDS - start))s (published or kept the live run: see the job log)"
          exit 0
        fi
        message=$(kubectl get "rayjob/$name" -o jsonpath='{.status.message}' || true)
        echo "error: rayjob/$name ended $deployment with job status ${job:-none} after $((SECONDS - start))s: ${message:-no message}" >&2
        exit 1
        ;;
    esac
  else
    missing=$((missing + 1))
    if [ "$missing" -ge "$missing_polls" ]; then
      echo "error: rayjob/$name cannot be read ($missing looks in a row); it was deleted or never started" >&2
      exit 1
    fi
  fi
  # SECONDS ticks in whole seconds, so -ge could fire a moment after start; -gt means at least timeout_s passed.
  if [ $((SECONDS - start)) -gt "$timeout_s" ]; then
    echo "error: rayjob/$name still not finished after ${timeout_s}s; deleting it" >&2
    kubectl delete "rayjob/$name" --wait=false || true
    exit 1
  fi
  sleep "$poll_s"
done
