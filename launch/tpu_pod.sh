#!/usr/bin/env bash
# mcti on a Cloud TPU VM pod slice: one process per worker, all started at once with --distributed.
#
#   launch/tpu_pod.sh create|install|mount|train|eval|logs|stop|status|run|delete [args...]
#
# Settings come from environment variables (see usage below); launch/README.md is the runbook.
# Run it from anywhere: the configs ship in the package (`--config mcti:pets`).
set -euo pipefail


usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh <command> [args...]

commands:
  create    create the TPU VM slice (SPOT=1: a queued-resource request for spot capacity)
  install   on every worker: Python >= 3.11, a venv with jax[tpu] and the package ($PACKAGE)
  mount     on every worker: mount gs://$BUCKET at $MOUNT_ROOT/$BUCKET with Cloud Storage FUSE
  train     `mcti train --distributed` on every worker at once; extra args go to mcti
            (e.g. --config.data.data_dir=gs://my-bucket/tfds --config.mesh.data=2)
  eval      `mcti eval --distributed` on every worker at once; extra args go to mcti
  logs      the job's log on worker $WORKER (default 0, the process that reports); args go to tail
  stop      SIGTERM to mcti on every worker: it saves a checkpoint at the next step and exits 143
  status    the slice's state, and on every worker whether mcti runs or how it ended
  run       a shell command on every worker, e.g. launch/tpu_pod.sh run 'df -h /gcs'
  delete    delete the slice (and its queued resource)

settings (environment variables, [default]):
  TPU_NAME          name of the TPU VM slice                                        (required)
  ZONE              its zone, e.g. us-central2-b for v4, us-west4-a for v5e          (required)
  PROJECT           Google Cloud project [gcloud's core/project]
  ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-16, v5p-32, v6e-16 [v4-32]
  RUNTIME_VERSION   TPU software version [tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for v5e,
                    v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e]
  SPOT              1: spot capacity (preemptible, much cheaper) [0]
  QUEUED            1: create through a queued resource, which waits for capacity [$SPOT]
  QUEUED_RESOURCE   the queued resource's name [$TPU_NAME-qr]
  AUTOCHECKPOINT    1: --autocheckpoint-enabled (gcloud alpha; Preview; v2-v4 and v5e): maintenance
                    events send SIGTERM to mcti first, so it saves a checkpoint [0]
  PACKAGE           what `install` pip-installs: a pip URL such as git+https://github.com/mcti-jax/mcti-jax@COMMIT,
                    or a local wheel file (copied to every worker), e.g. dist/mcti_jax-0.1.0-py3-none-any.whl
  JAX_SPEC          jax with its TPU runtime ["jax[tpu]>=0.10.2", the lower bound of pyproject.toml]
  EXTRA_PIP         more pip requirements for the venv [gcsfs: gs:// paths (tfds data_dir, the compile
                    cache) need it where tensorflow is not installed]
  PYTHON            the interpreter for the venv; installed with apt when missing [python3.11]
  REMOTE_DIR        folder in each worker's home with venv/ and logs/ [mcti]
  BUCKET            the GCS bucket that `mount` mounts (name without gs://)
  MOUNT_ROOT        where buckets are mounted [/gcs]
  WORKDIR           the run's workdir on the shared mount, e.g. /gcs/my-bucket/runs/pets     (train, eval)
  CACHE_DIR         the shot-encoding cache, shared by all workers [the folder beside WORKDIR: .../runs/cache]
  TRAIN_CONFIG      config of `train` [mcti:pets]
  EVAL_CONFIG       config of `eval` [eval:pets]
  FOREGROUND        1: train/eval stay attached to this terminal and exit with mcti's code [0: detached,
                    log in ~/$REMOTE_DIR/logs/mcti.log on each worker]
  JOB_ENV           environment for mcti on the workers, words VAR=value, e.g.
                    JOB_ENV="JAX_COMPILATION_CACHE_DIR=gs://my-bucket/jax-cache" (kept across new VMs)
  CHECK_SHARED      0: don't refuse a WORKDIR on the workers' own disks (a one-host slice) [1]
  WORKER            the worker of `logs` [0]
  SSH_FLAGS         extra flags for `gcloud compute tpus tpu-vm ssh/scp`, e.g. --internal-ip
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

# need VAR...: stop with what to set when a setting is missing.
need() {
  local var hint
  for var in "$@"; do
    [[ -n ${!var:-} ]] && continue
    case $var in
      TPU_NAME) hint="a name for the slice, e.g. TPU_NAME=mcti-v4-32" ;;
      ZONE) hint="the slice's zone, e.g. ZONE=us-central2-b (v4) or ZONE=us-west4-a (v5e)" ;;
      PACKAGE) hint="a pip URL, e.g. PACKAGE=git+https://github.com/mcti-jax/mcti-jax@COMMIT, or a wheel from
  python -m pip wheel --no-deps -w dist .   e.g. PACKAGE=dist/mcti_jax-0.1.0-py3-none-any.whl" ;;
      BUCKET) hint="the GCS bucket to mount, e.g. BUCKET=my-bucket (see launch/README.md: storage)" ;;
      WORKDIR) hint="the run's workdir on the shared mount, e.g. WORKDIR=/gcs/my-bucket/runs/pets" ;;
      *) hint="see: launch/tpu_pod.sh help" ;;
    esac
    die "$var is not set: $hint"
  done
}

# Settings with defaults.
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
case $ACCELERATOR_TYPE in
  v6e*) default_runtime=v2-alpha-tpuv6e ;;
  v5p*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod* | v5e*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION=${RUNTIME_VERSION:-$default_runtime}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-$SPOT}
AUTOCHECKPOINT=${AUTOCHECKPOINT:-0}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]>=0.10.2"}
PYTHON=${PYTHON:-python3.11}
EXTRA_PIP=${EXTRA_PIP-gcsfs}
REMOTE_DIR=${REMOTE_DIR:-mcti}
MOUNT_ROOT=${MOUNT_ROOT:-/gcs}
TRAIN_CONFIG=${TRAIN_CONFIG:-mcti:pets}
EVAL_CONFIG=${EVAL_CONFIG:-eval:pets}
FOREGROUND=${FOREGROUND:-0}
CHECK_SHARED=${CHECK_SHARED:-1}
WORKER=${WORKER:-0}
read -r -a ssh_flags <<<"${SSH_FLAGS:-}"
read -r -a job_env <<<"${JOB_ENV:-}"

# loc: gcloud's zone and project flags.
location() {
  need ZONE
  loc=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then loc+=(--project="$PROJECT"); fi
}

# on_workers WHICH SCRIPT [ARGS...]: run the bash SCRIPT with ARGS on worker(s) WHICH (all, 0, 1-3, ...).
on_workers() {
  local which=$1 script=$2
  shift 2
  need TPU_NAME
  location
  local remote
  remote="bash -c $(printf '%q' "$script") tpu_pod$(printf ' %q' "$@")"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${loc[@]}" --worker="$which" "${ssh_flags[@]}" --command="$remote"
}

# copy_to_workers SRC DEST [scp flags]: SRC from here to DEST (relative to the home folder) on every worker.
copy_to_workers() {
  local src=$1 dest=$2
  shift 2
  location
  gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:$dest" "${loc[@]}" --worker=all "${ssh_flags[@]}" "$@"
}

cmd_create() {
  need TPU_NAME
  location
  local gcloud=(gcloud) extra=()
  if [[ $AUTOCHECKPOINT == 1 ]]; then gcloud+=(alpha); extra+=(--autocheckpoint-enabled); fi
  if [[ $SPOT == 1 ]]; then extra+=(--spot); fi
  if [[ $QUEUED == 1 ]]; then
    local qr=${QUEUED_RESOURCE:-$TPU_NAME-qr}
    "${gcloud[@]}" compute tpus queued-resources create "$qr" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${loc[@]}" "${extra[@]}"
    echo "requested $qr; the slice exists once its state is ACTIVE: launch/tpu_pod.sh status"
  else
    "${gcloud[@]}" compute tpus tpu-vm create "$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${loc[@]}" "${extra[@]}"
  fi
}

# On a worker: $1 folder, $2 python, $3 jax spec, $4 package spec, $5 more pip requirements (words).
read -r -d '' INSTALL <<'EOF' || true
set -euo pipefail
dir=$1 python=$2 jax_spec=$3 package=$4
read -r -a more <<<"$5"
cd "$HOME/$dir"
if ! command -v "$python" >/dev/null || ! "$python" -c 'import ensurepip' 2>/dev/null; then
  # TPU VM images are Ubuntu 22.04 (Python 3.10); jammy's universe has python3.11.
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q "$python" "$python-venv"
fi
[[ -x venv/bin/python ]] || "$python" -m venv venv
venv/bin/python -m pip install -q --upgrade pip
venv/bin/python -m pip install -q --upgrade "$jax_spec" "$package" "${more[@]}"
venv/bin/python -m pip install -q --force-reinstall --no-deps "$package"  # this build, even at the same version
echo "$(hostname): $(venv/bin/python -c 'import jax, mcti_jax; print("jax", jax.__version__, mcti_jax.__file__)')"
EOF

cmd_install() {
  need TPU_NAME PACKAGE
  local spec=$PACKAGE
  if [[ $PACKAGE == *.whl && ! -f $PACKAGE ]]; then
    die "no wheel $PACKAGE (build one with: python -m pip wheel --no-deps -w dist .)"
  fi
  # shellcheck disable=SC2016  # expands on the worker
  on_workers all 'mkdir -p "$HOME/$1"' "$REMOTE_DIR"
  if [[ -f $PACKAGE ]]; then  # a wheel built here: copy it to every worker
    copy_to_workers "$PACKAGE" "$REMOTE_DIR/"
    spec="./$(basename "$PACKAGE")"
  fi
  on_workers all "$INSTALL" "$REMOTE_DIR" "$PYTHON" "$JAX_SPEC" "$spec" "$EXTRA_PIP"
}

# On a worker: $1 bucket, $2 mount root. Flags: --implicit-dirs shows folders that other tools made;
# --metadata-cache-ttl-secs=0 lets every worker see at once what the others wrote (checkpoints, run.json);
# --rename-dir-limit lets folder renames (orbax's and the export's atomic commits) work on buckets without a
# hierarchical namespace (with one, renames are atomic and this limit is not used).
read -r -d '' MOUNT <<'EOF' || true
set -euo pipefail
bucket=$1 root=$2
if ! command -v gcsfuse >/dev/null; then
  repo="gcsfuse-$(lsb_release -c -s)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse
fi
if mountpoint -q "$root/$bucket"; then
  echo "$(hostname): $root/$bucket is mounted"
else
  sudo mkdir -p "$root/$bucket"
  sudo chown "$(id -u):$(id -g)" "$root/$bucket"
  gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 --rename-dir-limit=200000 "$bucket" "$root/$bucket"
  echo "$(hostname): mounted gs://$bucket at $root/$bucket"
fi
EOF

cmd_mount() {
  need TPU_NAME BUCKET
  on_workers all "$MOUNT" "$BUCKET" "$MOUNT_ROOT"
}

# On a worker: $1 folder, $2 foreground (0/1), $3 the workdir that must be on a shared mount ("": not checked),
# then the mcti command. Detached, the job runs in its own session (it outlives the ssh connection), its output
# goes to logs/mcti.log, its pid to logs/mcti.pid and its exit code to logs/mcti.rc.
read -r -d '' JOB <<'EOF' || true
set -euo pipefail
dir=$1 foreground=$2 shared=$3
shift 3
cd "$HOME/$dir"
export PATH="$HOME/$dir/venv/bin:$PATH"
[[ -x venv/bin/mcti ]] || { echo "$(hostname): no venv/bin/mcti: run launch/tpu_pod.sh install" >&2; exit 1; }
if [[ -n $shared ]]; then
  # After a reboot (maintenance) the mount point is an empty folder: a run there would start afresh on each
  # worker's own disk instead of resuming.
  existing=$shared
  while [[ ! -e $existing ]]; do existing=$(dirname "$existing"); done
  if [[ $(findmnt -n -o TARGET -T "$existing") == / ]]; then
    echo "$(hostname): $shared is on this worker's own disk, not on a shared mount: launch/tpu_pod.sh mount" \
      "(CHECK_SHARED=0 skips this check)" >&2
    exit 1
  fi
fi
if [[ $foreground == 1 ]]; then
  exec "$@"
fi
mkdir -p logs
if [[ -f logs/mcti.pid ]] && kill -0 "$(<logs/mcti.pid)" 2>/dev/null; then
  echo "$(hostname): mcti is still running (pid $(<logs/mcti.pid)); wait, or: launch/tpu_pod.sh stop" >&2
  exit 1
fi
rm -f logs/mcti.rc logs/mcti.pid
echo "=== $(date -Is) $*" >>logs/mcti.log
# shellcheck disable=SC2016  # the inner script's own expansions
nohup setsid bash -c '"$@" & echo $! >logs/mcti.pid; wait $! && rc=0 || rc=$?; echo $rc >logs/mcti.rc' job "$@" \
  >>logs/mcti.log 2>&1 </dev/null &
echo "$(hostname): started; log: ~/$dir/logs/mcti.log"
EOF

# start_mcti COMMAND CONFIG CACHE_FIELD [mcti args...]: `mcti COMMAND --distributed` on every worker at once.
start_mcti() {
  need TPU_NAME WORKDIR
  local command=$1 config=$2 cache_field=$3
  shift 3
  local cache_dir=${CACHE_DIR:-$(dirname "$WORKDIR")/cache} shared=""
  if [[ $CHECK_SHARED == 1 ]]; then shared=$WORKDIR; fi
  local argv=(mcti "$command" --distributed --config "$config" "--config.workdir=$WORKDIR" \
    "--config.$cache_field=$cache_dir" "$@")
  on_workers all "$JOB" "$REMOTE_DIR" "$FOREGROUND" "$shared" env "${job_env[@]}" "${argv[@]}"
}

cmd_train() { start_mcti train "$TRAIN_CONFIG" data.cache_dir "$@"; }

cmd_eval() { start_mcti eval "$EVAL_CONFIG" train.data.cache_dir "$@"; }

cmd_logs() {
  local args=("$@")
  if ((${#args[@]} == 0)); then args=(-n 50); fi
  # shellcheck disable=SC2016  # expands on the worker
  on_workers "$WORKER" 'cd "$HOME/$1" && shift && tail "$@" logs/mcti.log' "$REMOTE_DIR" "${args[@]}"
}

read -r -d '' STOP <<'EOF' || true
cd "$HOME/$1" 2>/dev/null || { echo "$(hostname): no ~/$1"; exit 0; }
if [[ -f logs/mcti.pid ]] && kill -0 "$(<logs/mcti.pid)" 2>/dev/null; then
  kill -TERM "$(<logs/mcti.pid)"
  echo "$(hostname): SIGTERM sent to mcti (pid $(<logs/mcti.pid)): it saves a checkpoint at the next step," \
    "then exits 143"
else
  echo "$(hostname): mcti is not running"
fi
EOF

cmd_stop() {
  on_workers all "$STOP" "$REMOTE_DIR"
}

read -r -d '' JOB_STATE <<'EOF' || true
cd "$HOME/$1" 2>/dev/null || { echo "$(hostname): not installed"; exit 0; }
if [[ -f logs/mcti.pid ]] && kill -0 "$(<logs/mcti.pid)" 2>/dev/null; then
  echo "$(hostname): mcti running (pid $(<logs/mcti.pid))"
elif [[ -f logs/mcti.rc ]]; then
  rc=$(<logs/mcti.rc)
  case $rc in
    0) what="finished" ;;
    143 | 130) what="stopped at a checkpoint: run the same command again to resume" ;;
    *) what="failed: launch/tpu_pod.sh logs" ;;
  esac
  echo "$(hostname): mcti exited $rc ($what)"
else
  echo "$(hostname): no job (or it was killed without a word: preemption, maintenance)"
fi
EOF

cmd_status() {
  need TPU_NAME
  location
  if [[ $QUEUED == 1 ]]; then
    gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE:-$TPU_NAME-qr}" "${loc[@]}" \
      --format="value(state.state)"
  fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${loc[@]}" \
    --format="yaml(state,health,acceleratorType,runtimeVersion)"
  on_workers all "$JOB_STATE" "$REMOTE_DIR" || die "the workers did not answer (a preempted or stopped slice?)"
}

cmd_run() {
  (($# == 1)) || die "run takes one shell command in quotes, e.g. launch/tpu_pod.sh run 'df -h'"
  on_workers all "$1"
}

cmd_delete() {
  need TPU_NAME
  location
  if [[ $QUEUED == 1 ]]; then
    gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE:-$TPU_NAME-qr}" "${loc[@]}" --force --quiet
  else
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${loc[@]}" --quiet
  fi
}

main() {
  if (($# == 0)); then
    usage >&2
    exit 2
  fi
  local sub=$1
  shift
  case $sub in
    create | install | mount | train | eval | logs | stop | status | run | delete) "cmd_$sub" "$@" ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      die "unknown command: $sub"
      ;;
  esac
}

main "$@"
