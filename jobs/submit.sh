#!/usr/bin/env bash
# Submit a patchsweep sweep to a running Ray cluster as a Ray job; waits and exits with the job's status.
#
#   RAY_ADDRESS=http://<head>:8265 jobs/submit.sh output_root=/shared/patchsweep [hydra overrides ...]
#   jobs/submit.sh output_root=/shared/ps experiment=refusal_tiny resources=gpu 'patching.components=[resid_pre,head]'
#
# Environment:
#   RAY_ADDRESS          the cluster's job (dashboard) address, default http://127.0.0.1:8265
#   RAY_AUTH_TOKEN       the cluster's auth token, or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token
#                        (`ray get-auth-token` on the head prints it)
#   RAY_AUTH_MODE        token (the default here); disabled only for a cluster started without auth
#   RUNTIME_ENV          runtime env file, default jobs/runtime_env.yaml
#   SUBMISSION_ID        a job id of your choosing (ray job status/logs/stop <id>)
#   RAY                  the ray command, default `ray`
#   SUBMIT_NO_WAIT=1     return once submitted instead of following the logs
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runtime_env="${RUNTIME_ENV:-$repo/jobs/runtime_env.yaml}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"

fail() { echo "submit.sh: error: $*" >&2; exit 2; }

# Results are written by actors on every node and read by the driver: they must go to storage that all
# nodes share. The job's own folder is a temporary copy of the repository, deleted with the session.
case " $* " in
  *" output_root="*|*" output_dir="*) ;;
  *) fail "no output folder: pass output_root=<a folder every node of the cluster can write and you can read>" ;;
esac

# Token authentication stays on unless the user turns it off explicitly.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  [[ -s "$token_file" ]] || fail "no Ray auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, printed by \`ray get-auth-token\` on the head"
fi

cd "$repo"  # working_dir: . in the runtime env is the repository
args=(job submit --address "$RAY_ADDRESS" --runtime-env "$runtime_env")
[[ -n "${SUBMISSION_ID:-}" ]] && args+=(--submission-id "$SUBMISSION_ID")
[[ "${SUBMIT_NO_WAIT:-0}" == 1 ]] && args+=(--no-wait)
# ray.address=auto: the driver joins the cluster the job runs on (Ray sets RAY_ADDRESS inside the job).
exec "${RAY:-ray}" "${args[@]}" -- python -m pipeline ray.address=auto "$@"
