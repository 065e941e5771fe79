#!/usr/bin/env bash
# slurm-up.sh - bring up a real, local Slurm cluster on this one machine for argen's CI and
# development (Debian 12, root, no systemd, no cgroup plugins). Idempotent: safe to run again.
# Adapted from shared/reference/infra/slurm-up.sh (see the README, "Local cluster for development and CI").
#
#   SLURM_NODES=2            emulated compute nodes n1..nN (multiple-slurmd, all on 127.0.0.1)
#   SLURM_CPUS_PER_NODE=2    CPUs each node advertises (may exceed nproc)
#   SLURM_MEM_PER_NODE=...   RealMemory (MB) per node (default: 80% of RAM / nodes)
#   SLURM_FAKE_GPUS=2        advertise N fake "gpu" GRES per node (char-device aliases of /dev/null; 0 = none)
#   SLURM_CLEAN_STATE=1      start slurmctld with -c (forget old jobs/node states; job ids
#                            keep counting - use slurm-down.sh --purge to restart them at 1)
#   SLURM_UP_TIMEOUT=60      seconds to wait for all nodes to be idle
#
# Daemons: munged (own socket /run/slurm-munge/munge.socket.2), slurmctld, one slurmd per node.
# Each slurmd runs in its own mount+UTS namespace (unshare): its hostname is the node name and a
# private /etc/hosts (bind-mounted from /run/slurm/hosts) resolves n1..nN to 127.0.0.1 for the
# jobs it runs. The real /etc/hosts and hostname are not touched.
# PID files: /run/slurm-munge/munged.pid, /run/slurm/slurmctld.pid, /run/slurm/slurmd-<node>.pid
# Stop with slurm-down.sh (same directory).
set -euo pipefail

NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS_PER_NODE:-2}
FAKE_GPUS=${SLURM_FAKE_GPUS:-2}
CLEAN=${SLURM_CLEAN_STATE:-1}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

MUNGE_RUN=/run/slurm-munge
MUNGE_SOCK=$MUNGE_RUN/munge.socket.2
MUNGE_PID=$MUNGE_RUN/munged.pid
RUN=/run/slurm
CONF=/etc/slurm/slurm.conf
T0=$(date +%s.%N)

say() { printf '[slurm-up %5.1fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
die() {
  echo "slurm-up: ERROR: $*" >&2
  for f in /var/log/slurm-munge/munged.log /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log; do
    [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
# alive PIDFILE COMM -> 0 if the PID in PIDFILE is running and is COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] &&
    ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null   # a killed daemon may linger as a zombie
}
wait_for() { # wait_for SECONDS CMD...
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.2; done
}

[ "$(id -u)" = 0 ] || die "must run as root"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODES must be a positive integer"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_CPUS_PER_NODE must be a positive integer"

# ---------------------------------------------------------------- 1. packages
PKGS="slurmctld slurmd slurm-client munge"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $missing >/tmp/slurm-up-apt.log 2>&1 || {
    apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 &&
    apt-get install -y -q --no-install-recommends $missing >>/tmp/slurm-up-apt.log 2>&1; } ||
    die "apt-get install failed, see /tmp/slurm-up-apt.log"
fi
command -v unshare >/dev/null || die "unshare (util-linux) missing"
say "packages ok ($(slurmctld -V))"

# ---------------------------------------------------------------- 2. directories, key
install -d -o slurm -g slurm -m 0755 $RUN /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d -o root -g root -m 0755 /var/lib/slurm/slurmd
install -d -o munge -g munge -m 0755 $MUNGE_RUN           # munged insists: owned by munge/root,
install -d -o munge -g munge -m 0700 /var/lib/slurm-munge /var/log/slurm-munge  # not writable by others
if [ ! -s /etc/munge/munge.key ]; then
  install -d -o munge -g munge -m 0700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

# ---------------------------------------------------------------- 3. config
MEM_TOTAL=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)
MEM=${SLURM_MEM_PER_NODE:-$(( MEM_TOTAL * 8 / 10 / NODES ))}
DEFMEM=$(( MEM / CPUS ))
if [ "$NODES" = 1 ]; then NODELIST=n1; PORTS=6818; else NODELIST="n[1-$NODES]"; PORTS="[6818-$((6817 + NODES))]"; fi
GRES_NODE=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$FAKE_GPUS"; fi

new=$(mktemp)
cat >"$new" <<EOF
# Written by slurm-up.sh - local test cluster, $NODES emulated node(s) on 127.0.0.1
ClusterName=localci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# own munge socket; cred_expire also sets how long a requeued job waits (default 120 s)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# no cgroups / systemd needed:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
SchedulerType=sched/backfill
# re-evaluate pending jobs every 2 s (defaults 60 s / 30 s): requeued jobs and jobs whose
# BeginTime passed start promptly
SchedulerParameters=sched_interval=2,bf_interval=2
# no slurmdbd: sacct does not work; finished jobs stay in 'scontrol show job' for MinJobAge s
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=600
ReturnToService=2
# emulated nodes may advertise more CPUs than the machine has
SlurmdParameters=config_overrides
SlurmdTimeout=60
SlurmctldTimeout=30
InactiveLimit=0
KillWait=5
$GRES_TYPES
NodeName=$NODELIST NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
sed -i '/^$/d' "$new"
newgres=$(mktemp)
if [ "$FAKE_GPUS" -gt 0 ]; then
  install -d -m 0755 /var/lib/slurm/fake-dev
  # Slurm only exports CUDA_VISIBLE_DEVICES for GRES files that are character devices:
  # use aliases of /dev/null (major 1, minor 3) as fake GPUs
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    f=/var/lib/slurm/fake-dev/nvidia$i
    [ -c "$f" ] || { rm -f "$f"; mknod -m 0666 "$f" c 1 3; }
  done
  echo "NodeName=$NODELIST Name=gpu File=/var/lib/slurm/fake-dev/nvidia[0-$((FAKE_GPUS - 1))]" >"$newgres"
fi

changed=0
if ! cmp -s "$new" "$CONF"; then changed=1; fi
if [ -s "$newgres" ]; then
  if ! cmp -s "$newgres" /etc/slurm/gres.conf; then changed=1; fi
elif [ -e /etc/slurm/gres.conf ]; then
  changed=1
fi
if [ "$changed" = 1 ]; then
  if alive $RUN/slurmctld.pid slurmctld || ls $RUN/slurmd-*.pid >/dev/null 2>&1; then
    say "config changed: restarting daemons"
    "$HERE/slurm-down.sh" --keep-munge
  fi
  install -m 0644 "$new" "$CONF"
  if [ -s "$newgres" ]; then install -m 0644 "$newgres" /etc/slurm/gres.conf; else rm -f /etc/slurm/gres.conf; fi
  say "wrote $CONF"
fi
rm -f "$new" "$newgres"
{ cat /etc/hosts; echo "127.0.0.1 $(seq -f 'n%g' -s ' ' 1 "$NODES")"; } >$RUN/hosts

# ---------------------------------------------------------------- 4. munged
if alive $MUNGE_PID munged; then
  say "munged already running (pid $(cat $MUNGE_PID))"
else
  rm -f $MUNGE_PID $MUNGE_SOCK $MUNGE_SOCK.lock
  runuser -u munge -- /usr/sbin/munged --socket=$MUNGE_SOCK --pid-file=$MUNGE_PID \
    --log-file=/var/log/slurm-munge/munged.log --seed-file=/var/lib/slurm-munge/munged.seed ||
    die "munged failed to start"
  wait_for 10 alive $MUNGE_PID munged || die "munged did not write its pid file"
  say "munged started (pid $(cat $MUNGE_PID))"
fi
munge -n -S $MUNGE_SOCK | unmunge -S $MUNGE_SOCK >/dev/null || die "munge/unmunge round trip failed"

# ---------------------------------------------------------------- 5. slurmctld
if alive $RUN/slurmctld.pid slurmctld; then
  say "slurmctld already running (pid $(cat $RUN/slurmctld.pid))"
else
  rm -f $RUN/slurmctld.pid
  # state left by a cluster with another ClusterName makes slurmctld refuse to start
  if [ -e /var/lib/slurm/slurmctld/clustername ] &&
     [ "$(cat /var/lib/slurm/slurmctld/clustername)" != localci ]; then
    rm -f /var/lib/slurm/slurmctld/clustername
  fi
  if [ "$CLEAN" = 1 ]; then /usr/sbin/slurmctld -c -i; else /usr/sbin/slurmctld -i; fi || die "slurmctld failed to start"
  wait_for 20 scontrol ping || die "slurmctld does not answer 'scontrol ping'"
  wait_for 5 alive $RUN/slurmctld.pid slurmctld || die "slurmctld pid file missing"
  say "slurmctld started (pid $(cat $RUN/slurmctld.pid))"
fi

# ---------------------------------------------------------------- 6. slurmd per node
ns_ok=1
unshare --mount --uts --propagation private true 2>/dev/null || {
  ns_ok=0; echo "slurm-up: WARNING: unshare not permitted; nodes run without own hostname/hosts" >&2; }
for i in $(seq 1 "$NODES"); do
  n=n$i
  if alive $RUN/slurmd-$n.pid slurmd; then
    say "slurmd $n already running (pid $(cat $RUN/slurmd-$n.pid))"; continue
  fi
  rm -f $RUN/slurmd-$n.pid
  install -d -m 0755 /var/lib/slurm/slurmd/$n
  if [ "$ns_ok" = 1 ]; then
    unshare --mount --uts --propagation private \
      sh -c "hostname $n && mount --bind $RUN/hosts /etc/hosts && exec /usr/sbin/slurmd -N $n" ||
      die "slurmd $n failed to start"
  else
    /usr/sbin/slurmd -N $n || die "slurmd $n failed to start"
  fi
  wait_for 10 alive $RUN/slurmd-$n.pid slurmd || die "slurmd $n did not write its pid file"
  say "slurmd $n started (pid $(cat $RUN/slurmd-$n.pid))"
done

# ---------------------------------------------------------------- 7. wait for idle
all_idle() {
  local s
  s=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(echo "$s" | grep -c ' idle$')" -eq "$NODES" ] ||
    # nodes already running jobs (re-run while busy) also count as up
    [ "$(echo "$s" | grep -E -c ' (idle|mixed|allocated|completing)$')" -eq "$NODES" ]
}
# a node left DOWN/DRAIN by an earlier run: resume it
for n in $(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /down|drain|fail/ {print $1}'); do
  scontrol update nodename="$n" state=resume 2>/dev/null || true
done
if ! wait_for "$TIMEOUT" all_idle; then
  sinfo -N -l >&2 || true
  die "nodes not idle after ${TIMEOUT}s"
fi
sinfo -N -o '%N %T %c %m %G' | sed 's/^/    /'
say "cluster up: $NODES node(s), $CPUS CPU(s) each; controller localhost:6817"
