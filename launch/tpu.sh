#!/usr/bin/env bash
# Creates a Cloud TPU VM (or queued resource), sets up micle_jax on every worker, runs
# pretraining on all of them, and cleans up. `launch/tpu.sh help` prints the usage;
# launch/README.md is the guide.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [ARGS]

Commands:
  create            create the TPU VM, or with QUEUED=1 a queued resource
  setup             copy the repo to every worker and install the pinned stack with jax[tpu]
  run [ARGS...]     start training on every worker, in the background:
                      python -m $TRAIN_MODULE --config=$TRAIN_CONFIG --workdir=$GCS_WORKDIR ARGS...
                    (the same command resumes from the workdir's latest checkpoint)
  logs [WORKER]     follow the training log of worker WORKER (default 0; 'all' for every worker)
  ssh [WORKER]      open a shell on worker WORKER (default 0)
  status            describe the TPU VM (or the queued resource)
  stop              stop training on every worker
  delete            delete the TPU VM (or the queued resource and its VM); asks unless YES=1
  help              print this message

Settings come from the environment, or a bash file named by CONFIG (launch/config.env.example):
  TPU_NAME, ZONE, PROJECT   required by every command
  ACCELERATOR_TYPE          create: v4-8, v5litepod-16, v5p-8, v6e-8, ...
  RUNTIME_VERSION           create: default from the generation (tpu-ubuntu2204-base for v2-v4,
                            v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e)
  SPOT=1                    create a Spot TPU (cheap, preemptible at any time)
  PREEMPTIBLE=1             create a legacy preemptible TPU VM (not with QUEUED=1)
  RESERVED=1                use the project's reservation
  QUEUED=1                  create (and delete) a queued resource instead of a TPU VM directly
  VALID_UNTIL_DURATION      with QUEUED=1: give up if not provisioned within this (e.g. 6h)
  REPO_URL, GIT_REF         setup: git fetch this URL at GIT_REF (default HEAD) on the workers;
                            without REPO_URL, ships `git archive GIT_REF` of this checkout
  REMOTE_DIR                directory on the workers, relative to home (default micle_jax)
  PYTHON                    interpreter on the workers (default python3.11, installed by apt)
  GCS_WORKDIR               run: gs:// directory for checkpoints and TensorBoard summaries
  DATA_DIR                  run: gs:// TFDS data directory (exported as TFDS_DATA_DIR)
  TRAIN_MODULE              run: default micle_jax.main
  TRAIN_CONFIG              run: default configs/cxr.py
  FOLLOW=0, LOG_LINES       logs: print the last LOG_LINES lines (default 100) without following
  DRY_RUN=1                 print each command (gcloud, git) on one line instead of running it
  YES=1                     delete without asking
EOF
}

cmd_create() {
  require ACCELERATOR_TYPE
  local runtime=${RUNTIME_VERSION:-}
  [[ -n "$runtime" ]] || runtime=$(default_runtime_version "$ACCELERATOR_TYPE")
  local options=(--accelerator-type="$ACCELERATOR_TYPE")
  if is_true SPOT && { is_true PREEMPTIBLE || is_true RESERVED; }; then
    die "SPOT=1 excludes PREEMPTIBLE=1 and RESERVED=1"
  fi
  if is_true SPOT; then options+=(--spot); fi
  if is_true RESERVED; then options+=(--reserved); fi
  if is_true QUEUED; then
    if is_true PREEMPTIBLE; then die "PREEMPTIBLE=1 is for TPU VMs; with QUEUED=1 use SPOT=1"; fi
    if [[ -n "${VALID_UNTIL_DURATION:-}" ]]; then
      options+=(--valid-until-duration="$VALID_UNTIL_DURATION")
    fi
    queued_resources create --node-id="$TPU_NAME" --runtime-version="$runtime" "${options[@]}"
    info "Queued. Run 'launch/tpu.sh status' until the state is ACTIVE, then 'launch/tpu.sh setup'."
  else
    [[ -z "${VALID_UNTIL_DURATION:-}" ]] || die "VALID_UNTIL_DURATION needs QUEUED=1"
    if is_true PREEMPTIBLE; then options+=(--preemptible); fi
    tpu_vm create --version="$runtime" "${options[@]}"
    info "Next: launch/tpu.sh setup"
  fi
}

cmd_setup() {
  local dir fetch=()
  dir=$(quote "$REMOTE_DIR")
  if [[ -n "${REPO_URL:-}" ]]; then
    # init + fetch (not clone) also works when the directory exists, and for any branch, tag or sha.
    local url
    url=$(quote "$REPO_URL")
    fetch=(
      "git init -q $dir"
      "git -C $dir remote set-url origin $url 2>/dev/null || git -C $dir remote add origin $url"
      "git -C $dir fetch -q --depth=1 origin $(quote "$GIT_REF")"
      "git -C $dir checkout -q -f FETCH_HEAD"
    )
  else
    if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
      info "warning: uncommitted changes are not copied; setup ships 'git archive $GIT_REF'."
    fi
    local tarball remote_tar="$REMOTE_DIR.tar.gz"
    tarball=$(mktemp -d "${TMPDIR:-/tmp}/micle_jax.XXXXXX")/micle_jax.tar.gz
    # shellcheck disable=SC2064  # expand now: $tarball is out of scope when the trap fires.
    trap "rm -rf '$(dirname "$tarball")'" EXIT
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "$GIT_REF"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tar" \
      --worker=all --zone="$ZONE" --project="$PROJECT"
    remote_tar=$(quote "$remote_tar")
    fetch=("mkdir -p $dir" "tar -xzf $remote_tar -C $dir" "rm -f $remote_tar")
  fi
  # Install the pinned CPU stack, then jax[tpu] of the same version (adds libtpu), then the repo.
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600'
  local python pip=.venv/bin/pip jax venv_ok
  python=$(quote "$PYTHON")
  jax=$(jax_version)
  venv_ok="$python -c \"import ensurepip\" 2>/dev/null"
  on_workers all "${fetch[@]}" \
    "cd $dir" \
    "$venv_ok || { $apt update && $apt install -y python3.11-venv; }" \
    "$python -m venv .venv" \
    "$pip install -q --upgrade pip" \
    "$pip install -q -r requirements.txt" \
    "$pip install -q \"jax[tpu]==$jax\" -f $LIBTPU_FIND_LINKS" \
    "$pip install -q --no-deps -e ." \
    "echo \"micle_jax is set up on \$(hostname)\""
}

cmd_run() {
  if [[ "${1:-}" == -- ]]; then shift; fi # `run -- ARGS` works too; absl would drop ARGS after --.
  require GCS_WORKDIR
  check_gcs_path GCS_WORKDIR
  # MICLE_DISTRIBUTED=auto: jax.distributed.initialize() finds the other hosts (metadata server).
  local env='MICLE_DISTRIBUTED=auto '
  if [[ -n "${DATA_DIR:-}" ]]; then
    check_gcs_path DATA_DIR
    env+="$(quote "TFDS_DATA_DIR=$DATA_DIR") "
  fi
  local train=(.venv/bin/python -m "$TRAIN_MODULE"
    --config="$TRAIN_CONFIG" --workdir="$GCS_WORKDIR")
  # On the workers: refuse to start twice, detach from ssh, append to the log (a resumed run adds
  # to it) and keep the pid for `stop`.
  # shellcheck disable=SC2016
  local running='[ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null'
  on_workers all \
    "cd $(quote "$REMOTE_DIR")" \
    "if $running; then echo \"already running on \$(hostname)\" >&2; exit 1; fi" \
    "{ ${env}nohup $(shell_join "${train[@]}" "$@") >> train.log 2>&1 < /dev/null & }" \
    "echo \$! > train.pid" \
    "echo \"started on \$(hostname), log in \$(pwd)/train.log\""
  info "Follow with: launch/tpu.sh logs"
}

cmd_logs() {
  local tail=(tail -n "$LOG_LINES")
  if is_true FOLLOW; then tail+=(-F); fi
  on_workers "${1:-0}" "$(shell_join "${tail[@]}" "$REMOTE_DIR/train.log")"
}

cmd_ssh() {
  local worker=${1:-0}
  check_worker "$worker"
  tpu_vm ssh --worker="$worker"
}

cmd_status() {
  if is_true QUEUED; then queued_resources describe; else tpu_vm describe; fi
}

cmd_stop() {
  # shellcheck disable=SC2016
  local stopped='[ -f train.pid ] && kill "$(cat train.pid)" 2>/dev/null'
  on_workers all \
    "cd $(quote "$REMOTE_DIR")" \
    "if $stopped; then state=stopped; else state=\"not running\"; fi" \
    "rm -f train.pid" \
    "echo \"\$state on \$(hostname)\""
}

cmd_delete() {
  local what="TPU VM"
  if is_true QUEUED; then what="queued resource (and its TPU VM)"; fi
  if ! is_true YES; then
    local answer=''
    printf 'Delete %s %s in %s (project %s)? [y/N] ' "$what" "$TPU_NAME" "$ZONE" "$PROJECT" >&2
    read -r answer || true
    [[ "$answer" == y || "$answer" == yes ]] || die "not deleted"
  fi
  if is_true QUEUED; then queued_resources delete --force --quiet; else tpu_vm delete --quiet; fi
}

main() {
  local command=${1:-}
  if [[ $# -gt 0 ]]; then shift; fi
  case "$command" in
    help | -h | --help) usage ;;
    create | setup | run | logs | ssh | status | stop | delete)
      load_settings
      require TPU_NAME ZONE PROJECT
      "cmd_$command" "$@"
      ;;
    *)
      usage >&2
      die "unknown command '$command'"
      ;;
  esac
}

main "$@"
