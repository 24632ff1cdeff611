#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the scheduler tests and for trying `--backend slurm`.
#   scripts/slurm-local.sh up      install (Debian packages) when missing, configure, start, wait for the partition
#   scripts/slurm-local.sh down    stop the daemons this script started
#   scripts/slurm-local.sh status  daemons and `sinfo`
# Made for containers and CI: needs root, no systemd (daemons are started directly, logs under $STATE/log).
# Idempotent: `up` on a running cluster only checks it; the configuration is rewritten only when it changes.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/spool/slurm-local}     # spool, state, pid files and logs
CONF_DIR=/etc/slurm
PARTITION=debug
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
PKGS=(slurmctld slurmd slurm-client munge)
MARKER="# Written by scripts/slurm-local.sh"

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts system daemons)"; }

install_packages() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and apt-get is not available (Debian/Ubuntu only)"
  log "installing ${missing[*]} from Debian"
  # keep package scripts from starting services through init scripts: we start them ourselves
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ $own_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

node_name() { hostname -s; }

# RealMemory: what the node reports minus a margin, so slurmd never drains the node as "Low RealMemory".
real_memory_mb() {
  local kb; kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  local mb=$((kb / 1024))
  local margin=$((mb / 20 > 512 ? mb / 20 : 512))
  echo $((mb - margin > 256 ? mb - margin : 256))
}

write_config() {
  local node cpus mem tmp
  node=$(node_name); cpus=$(nproc); mem=$(real_memory_mb)
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,d,log,run}
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER: a single-node test cluster (root-only, no cgroups, no accounting).
ClusterName=dipcohort-local
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs become eligible again after cred_expire seconds (default 120 s); short for tests
AuthInfo=cred_expire=5
MailProg=/bin/true
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/run/slurmctld.pid
SlurmdPidFile=${STATE}/run/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# containers have no usable cgroup hierarchy: track processes by parent id, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# schedule every 2 s (defaults 60/30 s) so requeued and array tasks start promptly
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
# tiny on purpose: the tests' cohorts (4 jobs) get split into several arrays (real clusters: 1001+)
MaxArraySize=3
MaxJobCount=100000
# a killed or requeued job gets SIGTERM, then SIGKILL this many seconds later (default 30)
KillWait=2
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if ! cmp -s "$tmp" "$CONF_DIR/slurm.conf"; then
    mv "$tmp" "$CONF_DIR/slurm.conf"; chmod 644 "$CONF_DIR/slurm.conf"; CONFIG_CHANGED=1
  else
    rm -f "$tmp"
  fi
}

munge_key() {
  local key=/etc/munge/munge.key
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s "$key" ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force
    else dd if=/dev/urandom bs=1 count=1024 of="$key" 2>/dev/null; fi
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
  chmod 700 /etc/munge; chmod 400 "$key"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  munge_key
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
  if id munge >/dev/null 2>&1; then
    su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid" || munged --force
  else
    munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemons() {
  if [ "${CONFIG_CHANGED:-0}" = 1 ] && pid_alive "$STATE/run/slurmctld.pid"; then
    log "configuration changed: restarting the daemons"; stop_daemons
  fi
  # both daemons fork into the background and write their pid files
  pid_alive "$STATE/run/slurmctld.pid" || slurmctld
  pid_alive "$STATE/run/slurmd.pid" || slurmd
}

stop_daemons() {
  local f pid
  for f in slurmd slurmctld; do
    if pid_alive "$STATE/run/$f.pid"; then
      pid=$(cat "$STATE/run/$f.pid"); kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$STATE/run/$f.pid"
  done
}

partition_up() {
  # "up idle" (or mix/alloc when jobs run) for the partition's node
  local line; line=$(sinfo -h -p "$PARTITION" -o '%a %t' 2>/dev/null | head -1) || return 1
  [[ "$line" =~ ^up\ (idle|mix|alloc|comp) ]]
}

wait_up() {
  local node; node=$(node_name)
  for i in $(seq $((WAIT_S * 2))); do
    if partition_up; then log "partition '$PARTITION' is up on node $node ($(nproc) CPUs)"; return 0; fi
    # a node left down/drained from an earlier run comes back with an explicit resume
    if [ $((i % 10)) = 0 ] && sinfo -h -n "$node" -o '%t' 2>/dev/null | grep -qE 'down|drain'; then
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
    fi
    sleep 0.5
  done
  log "partition '$PARTITION' not up after ${WAIT_S}s; sinfo says: $(sinfo -h -o '%P %a %t %E' 2>&1 || true)"
  for f in slurmctld slurmd; do log "---- last lines of $STATE/log/$f.log"; tail -n 30 "$STATE/log/$f.log" >&2 2>/dev/null || true; done
  exit 1
}

case "${1:-}" in
  up)
    need_root
    t0=$(date +%s)
    if [ -f "$CONF_DIR/slurm.conf" ] && ! grep -q "^$MARKER" "$CONF_DIR/slurm.conf"; then
      # a real Slurm installation: never overwrite its configuration
      if command -v sinfo >/dev/null && sinfo -h -o '%a' 2>/dev/null | grep -q '^up'; then
        log "a Slurm configured elsewhere ($CONF_DIR/slurm.conf) is up: using it"; sinfo; exit 0
      fi
      die "$CONF_DIR/slurm.conf was not written by this script and its cluster is not up; not touching it"
    fi
    install_packages
    CONFIG_CHANGED=0
    write_config
    if [ "$CONFIG_CHANGED" = 0 ] && pid_alive "$STATE/run/slurmctld.pid" && partition_up; then
      log "already up"; sinfo; exit 0
    fi
    start_munge
    start_daemons
    wait_up
    log "ready in $(( $(date +%s) - t0 ))s"
    sinfo
    ;;
  down)
    need_root
    stop_daemons
    log "slurmctld and slurmd stopped (munged left running)"
    ;;
  status)
    for f in slurmctld slurmd; do
      if pid_alive "$STATE/run/$f.pid"; then echo "$f: running (pid $(cat "$STATE/run/$f.pid"))"; else echo "$f: stopped"; fi
    done
    if ! command -v sinfo >/dev/null; then echo "sinfo: not installed (run: $0 up)"; exit 1; fi
    pid_alive "$STATE/run/slurmctld.pid" && sinfo && partition_up
    ;;
  *)
    echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
