#!/usr/bin/env bash
# A local single-node Ray cluster for charnn, bound to 127.0.0.1, with Ray's token auth on.
#   infra/local-cluster.sh start                  start the head (dashboard on 127.0.0.1:8265)
#   infra/local-cluster.sh submit SPEC [--set k=v] submit jobs/train.py with the repo as working_dir
#   infra/local-cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="$PWD/.venv/bin"
export PATH="$VENV_BIN:$PATH"  # jobs run the python of whoever ran `ray start`: this venv's
export RAY_USAGE_STATS_ENABLED=0 RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/
export AWS_EC2_METADATA_DISABLED=true RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token
DASHBOARD=http://127.0.0.1:8265

case "${1:-}" in
  start)
    # ~/.ray/auth_token: made once, kept after.  Ray writes it with the umask and no chmod (0644 in
    # a 0755 ~/.ray on most hosts), and whoever reads it can submit jobs as you: keep both private,
    # a token made before this script did included.
    (umask 077 && ray get-auth-token --generate >/dev/null)
    if [[ -f "$HOME/.ray/auth_token" ]]; then chmod 700 "$HOME/.ray" && chmod 600 "$HOME/.ray/auth_token"; fi
    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --num-cpus "${NUM_CPUS:-$(nproc)}" --disable-usage-stats ;;
  submit)
    shift
    spec="${1:?usage: $0 submit SPEC [--set k=v ...]}"; shift
    ray job submit --address "$DASHBOARD" --working-dir . -- python jobs/train.py --spec "$spec" "$@" ;;
  stop)
    ray stop ;;
  *)
    sed -n '2,5p' "$0"; exit 2 ;;
esac
