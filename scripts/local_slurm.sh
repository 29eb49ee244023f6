#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests and for trying the SLURM launcher without a cluster.
#
#   bash scripts/local_slurm.sh          # install (if needed), configure, start; wait until idle
#   bash scripts/local_slurm.sh status   # exit 0 when the node is up and accepting jobs
#   bash scripts/local_slurm.sh stop     # stop the slurmd, slurmctld and munged it started
#
# Needs root. Installs Debian's `slurm-wlm` and `munge` with apt-get when they are missing,
# writes /etc/slurm/slurm.conf for this host (its CPUs and memory as `slurmd -C` reports them,
# no GPUs, one partition `local`), starts `munged --force` (unless a munged already answers),
# `slurmctld` and `slurmd` as root and waits until `sinfo` shows the node idle. Running it again
# while everything is up changes nothing. State, logs and pid files live in $LOCAL_SLURM_DIR
# (default /var/lib/megatron-sega-slurm). An existing slurm.conf that this script did not write is
# left alone (the script stops instead).
#
# `stop` signals only the daemons this script started: a pid from one of its own pid files in
# $LOCAL_SLURM_DIR, whose process has the daemon's name, started no later than the pid file was
# written (a pid reused since is younger), and for munged was started with that pid file. It never
# reads the system's /run/munge/munged.pid: a munged it did not start (the system's, a cluster's)
# is left running, and so is whatever a stale pid file points at.
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/var/lib/megatron-sega-slurm}"
CONF=/etc/slurm/slurm.conf
HEADER="# written by megatron-sega scripts/local_slurm.sh"
HOST="$(hostname -s)"

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and this is not root; run as root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  echo "local_slurm: installing slurm-wlm and munge"
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
             slurm-wlm munge)
  "${apt[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && "${apt[@]}" >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
}

MUNGED_PID="$DIR/munged.pid"

started_at() {  # started_at PID: the second (since the epoch) at which process PID started
  local stat btime
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"  # the fields after "PID (comm) ": state is the 1st, starttime the 20th
  btime="$(awk '$1 == "btime" {print $2}' /proc/stat)"
  echo $((btime + $(echo "$stat" | awk '{print $20}') / $(getconf CLK_TCK)))
}

# our_pid FILE NAME [ARG]: print the pid in FILE (one of this script's pid files) when that process
# is the daemon NAME that wrote FILE: its name is NAME, it started no later than FILE was written
# (1 s of rounding allowed) and, with ARG, ARG is one of its arguments. Else print nothing, fail.
our_pid() {
  local file="$1" name="$2" arg="${3:-}" pid start
  [ -f "$file" ] || return 1
  pid="$(head -c 32 "$file" | tr -d '[:space:]')"
  [[ "$pid" =~ ^[1-9][0-9]{0,9}$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  if [ -n "$arg" ]; then
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$arg" || return 1
  fi
  start="$(started_at "$pid")" || return 1
  [ "$start" -le $(($(stat -c %Y "$file") + 1)) ] || return 1
  echo "$pid"
}

stop_daemon() {  # stop_daemon FILE NAME [ARG]: SIGTERM our daemon NAME and wait (10 s) for it
  local pid _
  pid="$(our_pid "$@")" || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
}

munge_answers() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {  # the system's munged when one answers, else ours (its pid file in $DIR)
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge "$DIR/log"
  if ! munge_answers && ! our_pid "$MUNGED_PID" munged "--pid-file=$MUNGED_PID" >/dev/null; then
    munged --force --pid-file="$MUNGED_PID" --log-file="$DIR/log/munged.log"
  fi
  local _
  for _ in $(seq 50); do munge_answers && return 0; sleep 0.1; done
  die "munged does not answer (see $DIR/log/munged.log)"
}

write_conf() {  # echoes 1 when the file changed
  local node
  node="$(slurmd -C 2>/dev/null | head -n 1)"  # NodeName=HOST CPUs=.. ... RealMemory=..
  [[ "$node" == NodeName=* ]] || die "'slurmd -C' did not describe this node: $node"
  mkdir -p /etc/slurm "$DIR/ctld" "$DIR/d" "$DIR/log"
  if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$HEADER"; then
    die "$CONF exists and was not written by this script; not touching it"
  fi
  local text
  text="$(cat <<EOF
$HEADER (one node, no GPUs)
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Start a requeued job as soon as it is eligible, not at the next minute's scheduling pass.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)"
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$text" ]; then echo 0; return; fi
  printf '%s\n' "$text" > "$CONF"
  echo 1
}

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1; }

up() {
  case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; esac
  return 1
}

stop() {
  stop_daemon "$DIR/slurmd.pid" slurmd
  stop_daemon "$DIR/slurmctld.pid" slurmctld
  stop_daemon "$MUNGED_PID" munged "--pid-file=$MUNGED_PID"
  echo "local_slurm: stopped"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons as root)"
  install_packages
  start_munge
  local changed
  changed="$(write_conf)"
  if [ "$changed" = 1 ]; then  # a new configuration: restart what runs with the old one
    stop_daemon "$DIR/slurmd.pid" slurmd
    stop_daemon "$DIR/slurmctld.pid" slurmctld
  fi
  our_pid "$DIR/slurmctld.pid" slurmctld >/dev/null || slurmctld
  our_pid "$DIR/slurmd.pid" slurmd >/dev/null || slurmd
  local _
  for _ in $(seq 120); do
    up && { echo "local_slurm: node $HOST is $(node_state)"; return 0; }
    case "$(node_state)" in  # a node left down or drained by an earlier run
      down*|drain*|drng*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $HOST is not idle after 60 s (state '$(node_state)'; see $DIR/log/)"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) up ;;
  *) die "unknown command '$1' (start, status or stop)" ;;
esac
