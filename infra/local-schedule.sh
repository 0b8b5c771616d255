#!/usr/bin/env bash
# Scheduled retraining on this machine: the local counterpart of infra/kuberay/raycronjob-retrain.yaml
# and infra/kubernetes/cronjob-submit.yaml.
#   infra/local-schedule.sh [SPEC] [--set k=v ...]     SPEC defaults to jobs/specs/shakespeare-retrain.yaml
# Starts the local head of infra/local-cluster.sh when none answers (127.0.0.1, token auth on),
# submits jobs/retrain.py with the repository as working_dir, waits for it, and exits with
#   0   the retrain finished (skipped, promoted or rejected: see the last JSON line of its log)
#   75  try again later, nothing written: another retrain holds the registry's lease, or the
#       Ray cluster did not answer within cluster.connect_timeout_s
#   1   it failed (ray job submit's status), 2 a usage error
# The head stays up for the next run; `infra/local-cluster.sh stop` ends it.
# From cron (crontab -e): nightly at 02:30, never two at once (flock -E 75 says "busy" as 75 too):
#   30 2 * * * cd /path/to/charnn && flock -n -E 75 /tmp/charnn-retrain.lock infra/local-schedule.sh >>"$HOME/retrain.log" 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # cron's PATH is minimal; the cluster runs this venv's Python
export RAY_USAGE_STATS_ENABLED=0 RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/
export AWS_EC2_METADATA_DISABLED=true RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token
DASHBOARD=http://127.0.0.1:8265

spec=jobs/specs/shakespeare-retrain.yaml
if [[ $# -gt 0 && $1 != -* ]]; then spec=$1; shift; fi
[[ -f $spec ]] || { echo "usage: $0 [SPEC] [--set k=v ...]: no spec file $spec" >&2; exit 2; }

if ! ray job list --address "$DASHBOARD" >/dev/null 2>&1; then
  infra/local-cluster.sh start
fi

id="charnn-retrain-$(date -u +%Y%m%dT%H%M%SZ)-$$"
rc=0
ray job submit --address "$DASHBOARD" --working-dir . --submission-id "$id" \
  -- python jobs/retrain.py --spec "$spec" "$@" || rc=$?
# `ray job submit` exits 1 for any failed job; pass "try again later" (busy, Ray away) on as 75.
if (( rc != 0 )) && ray job status --address "$DASHBOARD" "$id" 2>/dev/null \
    | grep -q 'failed with exit code 75'; then
  rc=75
fi
exit "$rc"
