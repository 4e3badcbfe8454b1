#!/usr/bin/env bash
# End leftover training processes recorded in PID files (run locks), never by name matching.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/kill_all.sh [options] [PATH ...]

End the training processes whose PIDs are recorded in PID files. train.py records the PID
of the process writing a run in its lock file: <save-dir>/<experiment>/<expid>/.lock for
local runs, and $NM_LOCK_DIR/<url>.lock (default ${TMPDIR:-/tmp}/neural-mechanics-locks)
for gs:// or s3:// runs. Each PATH is a PID file (one PID on its first line) or a folder
searched for run locks (.lock) and *.lock / *.pid files. Default PATHs: results and the
lock folder.

A recorded process is signalled only if it is alive and its command line mentions
train.py, torch.distributed.run or torchrun (a PID recycled by another program is left
alone; --force skips that check). Its descendants (DDP ranks, data-loader workers) are
signalled first. Under torchrun, ending rank 0 makes torchrun end the other ranks.

Options:
  --signal SIG      signal to send (default TERM; KILL for hung processes)
  --force           signal recorded processes whatever their command line
  --tpu NAME        run this script on every worker of TPU VM NAME (with --zone)
  --zone ZONE       zone of the TPU VM
  --repo DIR        the project folder on the TPU VM (default neural-mechanics)
  --dry-run         print what would be signalled (and the commands) without doing it
  -h, --help        show this help
USAGE
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

signal="TERM"
force=0
tpu=""
zone=""
repo="neural-mechanics"
nm_option() {
    case "$1" in
        --signal)
            nm_need_value "$@"
            signal="$2"
            NM_SHIFT=2
            ;;
        --force)
            force=1
            NM_SHIFT=1
            ;;
        --tpu)
            nm_need_value "$@"
            tpu="$2"
            NM_SHIFT=2
            ;;
        --zone)
            nm_need_value "$@"
            zone="$2"
            NM_SHIFT=2
            ;;
        --repo)
            nm_need_value "$@"
            repo="$2"
            NM_SHIFT=2
            ;;
    esac
}
nm_parse_args "$@"
paths=("${NM_ARGS[@]}")

if ! [[ "$signal" =~ ^(SIG)?[A-Z0-9]+$ ]]; then
    nm_usage_error "--signal takes a signal name such as TERM or KILL, got '$signal'"
fi

if [[ -n "$tpu" ]]; then
    if [[ -z "$zone" ]]; then
        nm_usage_error "--tpu needs --zone"
    fi
    remote_args=(--signal "$signal")
    if [[ $force -eq 1 ]]; then
        remote_args+=(--force)
    fi
    remote="cd $(nm_quote "$repo") && $(nm_quote scripts/kill_all.sh "${remote_args[@]}" "${paths[@]}")"
    nm_run gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all "--command=$remote"
    exit 0
fi

lock_dir="${NM_LOCK_DIR:-${TMPDIR:-/tmp}/neural-mechanics-locks}"
if [[ ${#paths[@]} -eq 0 ]]; then
    paths=(results "$lock_dir")
fi

pid_files=()
for p in "${paths[@]}"; do
    if [[ -f "$p" ]]; then
        pid_files+=("$p")
    elif [[ -d "$p" ]]; then
        while IFS= read -r -d '' f; do
            pid_files+=("$f")
        done < <(find "$p" -type f \( -name '.lock' -o -name '*.lock' -o -name '*.pid' \) -print0)
    fi
done

descendants() {
    # children first, depth first, so that the recorded process is signalled last
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

is_training() {
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *train.py* || "$cmdline" == *torch.distributed.run* || "$cmdline" == *torchrun* ]]
}

signalled=0
for f in "${pid_files[@]}"; do
    pid="$(head -n 1 "$f" | tr -dc '0-9')"
    if [[ -z "$pid" ]]; then
        echo "kill_all.sh: $f holds no PID; skipped" >&2
        continue
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "$f: process $pid has ended"
        continue
    fi
    if [[ $force -eq 0 ]] && ! is_training "$pid"; then
        echo "$f: process $pid is not train.py (PID reused?); skipped (--force to signal it)" >&2
        continue
    fi
    echo "$f: signalling process $pid and its children with SIG${signal#SIG}"
    for child in $(descendants "$pid"); do
        nm_run kill "-${signal#SIG}" "$child" || true
    done
    nm_run kill "-${signal#SIG}" "$pid" || true
    signalled=$((signalled + 1))
done
echo "kill_all.sh: $signalled process(es) signalled"
