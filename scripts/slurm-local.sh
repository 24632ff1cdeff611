#!/usr/bin/env bash
# A real Slurm of NODES nodes on this one machine, for the scheduler tests and for trying `--backend slurm`.
#   scripts/slurm-local.sh up      install (Debian packages) when missing, configure, start, wait for the partition
#   NODES=2 scripts/slurm-local.sh up   nodes n1..nN: one slurmd each (`slurmd -N nK`, its own port, spool,
#                                  pid and log via %n), all on this host (default NODES=1: the host's name)
#   scripts/slurm-local.sh down    stop the daemons this script started
#   scripts/slurm-local.sh status  daemons and `sinfo`
# Made for containers and CI: needs root, no systemd (daemons are started directly, logs under $STATE/log).
# Idempotent: `up` on a running cluster only checks it; the configuration is rewritten only when it changes.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/spool/slurm-local}     # spool, state, pid files and logs
CONF_DIR=${SLURM_LOCAL_CONF_DIR:-/etc/slurm}
# a second test cluster beside the first (other config dir, state and ports): daemons and clients
# find its configuration through SLURM_CONF
[ "$CONF_DIR" = /etc/slurm ] || export SLURM_CONF="$CONF_DIR/slurm.conf"
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
PARTITION=debug
NODES=${NODES:-1}
SLURMD_PORT0=${SLURM_LOCAL_SLURMD_PORT:-17000}   # node K listens on SLURMD_PORT0 + K (several nodes only)
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

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "slurm-local: NODES must be a positive integer, got '$NODES'" >&2; exit 2; }

# one node: the host itself; several: n1..nN, each a slurmd of its own on this host
node_names() { if [ "$NODES" = 1 ]; then hostname -s; else seq -f 'n%g' 1 "$NODES"; fi; }
node_list() { node_names | paste -sd, -; }

# RealMemory: what the node reports minus a margin, so slurmd never drains the node as "Low RealMemory".
real_memory_mb() {
  local kb; kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  local mb=$((kb / 1024))
  local margin=$((mb / 20 > 512 ? mb / 20 : 512))
  echo $((mb - margin > 256 ? mb - margin : 256))
}

node_lines() {
  local cpus mem k=0 name
  cpus=$(nproc); mem=$(real_memory_mb)
  if [ "$NODES" = 1 ]; then
    echo "NodeName=$(hostname -s) NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    return
  fi
  # every node offers the host's CPUs and memory (they share them: a test cluster, not a benchmark)
  for name in $(node_names); do
    k=$((k + 1))
    echo "NodeName=${name} NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + k)) CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
  done
}

write_config() {
  local tmp nodes_conf
  nodes_conf=$(node_lines)
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,d,log,run}
  for name in $(node_names); do mkdir -p "$STATE/d/$name"; done
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER: a ${NODES}-node test cluster on one host (root-only, no cgroups, no accounting).
ClusterName=dipcohort-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs become eligible again after cred_expire seconds (default 120 s); short for tests
AuthInfo=cred_expire=5
MailProg=/bin/true
StateSaveLocation=${STATE}/ctld
# %n: the node name, so several slurmd on this host keep their own spool, pid and log
SlurmdSpoolDir=${STATE}/d/%n
SlurmctldPidFile=${STATE}/run/slurmctld.pid
SlurmdPidFile=${STATE}/run/slurmd-%n.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd-%n.log
# nodes declare the host's CPUs and memory each; do not drain them for "low" resources
SlurmdParameters=config_overrides
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
${nodes_conf}
PartitionName=${PARTITION} Nodes=$(node_list) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
  # the daemons fork into the background and write their pid files
  pid_alive "$STATE/run/slurmctld.pid" || slurmctld
  local name
  for name in $(node_names); do
    pid_alive "$STATE/run/slurmd-$name.pid" || slurmd -N "$name"
  done
}

stop_daemons() {
  local f pid
  # every slurmd this script may have started (any earlier node count), then the controller
  for f in "$STATE"/run/slurmd*.pid "$STATE/run/slurmctld.pid"; do
    [ -e "$f" ] || continue
    if pid_alive "$f"; then
      pid=$(cat "$f"); kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
  done
}

nodes_usable() {
  # how many of the partition's nodes are idle (or mix/alloc/completing when jobs run)
  sinfo -h -N -p "$PARTITION" -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc|comp)'
}

partition_up() {
  local line; line=$(sinfo -h -p "$PARTITION" -o '%a' 2>/dev/null | head -1) || return 1
  [ "$line" = up ] && [ "$(nodes_usable)" -ge "$NODES" ]
}

wait_up() {
  for i in $(seq $((WAIT_S * 2))); do
    if partition_up; then log "partition '$PARTITION' is up on node(s) $(node_list) ($(nproc) CPUs each)"; return 0; fi
    # a node left down/drained from an earlier run comes back with an explicit resume
    if [ $((i % 10)) = 0 ] && sinfo -h -N -o '%t' 2>/dev/null | grep -qE 'down|drain'; then
      scontrol update NodeName="$(node_list)" State=RESUME 2>/dev/null || true
    fi
    sleep 0.5
  done
  log "partition '$PARTITION' not up after ${WAIT_S}s; sinfo says: $(sinfo -h -o '%P %a %t %E' 2>&1 || true)"
  for f in "$STATE"/log/slurm*.log; do log "---- last lines of $f"; tail -n 30 "$f" >&2 2>/dev/null || true; done
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
    pid_alive "$STATE/run/slurmctld.pid" || echo "slurmctld: stopped"
    for f in "$STATE"/run/slurmctld.pid "$STATE"/run/slurmd*.pid; do
      [ -e "$f" ] || continue
      name=$(basename "$f" .pid)
      if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: stopped"; fi
    done
    if ! command -v sinfo >/dev/null; then echo "sinfo: not installed (run: $0 up)"; exit 1; fi
    pid_alive "$STATE/run/slurmctld.pid" && sinfo && partition_up
    ;;
  *)
    echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
