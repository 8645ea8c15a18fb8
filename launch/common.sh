# shellcheck shell=bash
# Shared by the launch scripts: settings, validation and the DRY_RUN-aware runner.
# Sourced, never executed. Written for bash 3.2+ (macOS's /bin/bash), so no bash-4 features.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

info() { printf '%s\n' "$*" >&2; }

# is_true NAME: whether the boolean setting NAME is on (1/true/yes); dies on any other value.
is_true() {
  case "${!1:-0}" in
    1 | true | yes) return 0 ;;
    0 | false | no | '') return 1 ;;
    *) die "$1=${!1} is not a boolean (use 1 or 0)" ;;
  esac
}

# require NAME...: dies naming every setting that is unset or empty.
require() {
  local name missing=''
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing="$missing $name"
  done
  [[ -z "$missing" ]] || die "missing setting(s):$missing" \
    "(export them, or set them in the file named by CONFIG; see launch/config.env.example)"
}

# load_settings: sources $CONFIG (if set) and fills in the defaults of optional settings.
load_settings() {
  if [[ -n "${CONFIG:-}" ]]; then
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file"
    # shellcheck source=/dev/null
    source "$CONFIG"
  fi
  # Every "is_true" setting is checked here, so that a typo fails before any command runs.
  local flag
  for flag in DRY_RUN YES SPOT PREEMPTIBLE RESERVED QUEUED FOLLOW; do is_true "$flag" || true; done
  GIT_REF=${GIT_REF:-HEAD}
  REMOTE_DIR=${REMOTE_DIR:-micle_jax}
  PYTHON=${PYTHON:-python3.11}
  TRAIN_MODULE=${TRAIN_MODULE:-micle_jax.main}
  TRAIN_CONFIG=${TRAIN_CONFIG:-configs/cxr.py}
  LOG_LINES=${LOG_LINES:-100}
  FOLLOW=${FOLLOW:-1}
}

# default_runtime_version ACCELERATOR_TYPE: the TPU VM image JAX recommends for that generation.
default_runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

# jax_version: the jax pin of requirements.txt, so that jax[tpu] matches the CPU stack.
jax_version() {
  local version
  version=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n "$version" ]] || die "no 'jax==' pin in $REPO_ROOT/requirements.txt"
  echo "$version"
}

# quote ARG: ARG as one shell word; single-quoted unless plainly safe, so dry runs stay readable.
quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$' rest=$1 quoted=''
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
    return
  fi
  while [[ "$rest" == *\'* ]]; do
    quoted+="${rest%%\'*}'\\''"
    rest=${rest#*\'}
  done
  printf "'%s'" "$quoted$rest"
}

# shell_join ARG...: ARGs quoted for a shell and joined by spaces (commands to print or send).
shell_join() {
  local arg separator='' flag='^--[a-z0-9-]+='
  for arg in "$@"; do
    printf '%s' "$separator"
    if [[ "$arg" =~ $flag ]]; then # --flag='value' reads better than '--flag=value'.
      printf '%s%s' "${arg%%=*}=" "$(quote "${arg#*=}")"
    else
      quote "$arg"
    fi
    separator=' '
  done
}

# run CMD ARG...: runs the command, or with DRY_RUN=1 prints it on one line, quoted to paste.
run() {
  if is_true DRY_RUN; then
    shell_join "$@"
    printf '\n'
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND ARG...: `gcloud compute tpus tpu-vm SUBCOMMAND $TPU_NAME` in ZONE and PROJECT.
tpu_vm() {
  local subcommand=$1
  shift
  run gcloud compute tpus tpu-vm "$subcommand" "$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" "$@"
}

# queued_resources SUBCOMMAND ARG...: the same for `gcloud compute tpus queued-resources`.
queued_resources() {
  local subcommand=$1
  shift
  run gcloud compute tpus queued-resources "$subcommand" "$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" "$@"
}

# on_workers WORKER STEP...: runs the shell STEPs over ssh on WORKER (a number or all), as one
# line that stops at the first failing step.
on_workers() {
  check_worker "$1"
  local worker=$1 script
  shift
  script=$1
  if [[ $# -gt 1 ]]; then
    printf -v script '; %s' "$@"
    script="set -e$script"
  fi
  tpu_vm ssh --worker="$worker" --command="$script"
}

check_worker() {
  [[ "$1" == all || "$1" =~ ^[0-9]+$ ]] || die "worker must be a number or 'all', got '$1'"
}

# check_gcs_path NAME: dies unless setting NAME is a gs://bucket/... path, which every worker sees.
check_gcs_path() {
  local pattern='^gs://[a-z0-9][-_.a-z0-9]*(/|$)'
  [[ "${!1}" =~ $pattern ]] || die "$1=${!1} must be a gs://BUCKET/... path (every worker reads it)"
}
