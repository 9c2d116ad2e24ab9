#!/usr/bin/env bash
# A real single-node Slurm cluster (Debian 12 packages, Slurm 22.05) for tests and local use, as root, without
# systemd. Idempotent: installs the packages with apt-get when missing, (re)writes the config only when it
# changed, starts only the daemons that are not running, and returns at once when the cluster is already up.
#
#   node `localhost` (127.0.0.1), partition `debug` (default), no GRES/GPUs, no cgroups;
#   jobcomp/filetxt so that `sacct -c` knows finished jobs without slurmdbd; MinJobAge=3600 so that scontrol
#   remembers finished jobs for an hour.
#
# SLURM_ACCT=dbd also starts MariaDB + slurmdbd so that plain `sacct` works (2 s more, ~100 MiB).
# Exit 0 when the cluster is up (prints one line), 1 when it could not be started (not root, no apt, …).
set -euo pipefail
SLURM_ACCT=${SLURM_ACCT:-none}
LOG=/var/log/slurm

if [ "$(id -u)" != 0 ]; then echo "slurm_up: must run as root" >&2; exit 1; fi

up() { sinfo -h -o %T 2>/dev/null | grep -qxE 'idle|mixed|allocated|completing'; }

pkgs="munge slurmctld slurmd slurm-client"
[ "$SLURM_ACCT" = dbd ] && pkgs="$pkgs slurmdbd mariadb-server"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  command -v apt-get >/dev/null || { echo "slurm_up: Slurm is not installed and there is no apt-get" >&2; exit 1; }
  echo "slurm_up: installing $pkgs" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >/dev/null
fi

mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd "$LOG" /run/slurm /etc/slurm
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key

CPUS=$(nproc); MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
cat > "$conf" <<CONF
# Written by agentpipe scripts/slurm_up.sh (single-node test cluster)
ClusterName=agentpipe
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
KillWait=5
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
if [ "$SLURM_ACCT" = dbd ]; then
  printf 'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nJobAcctGatherType=jobacct_gather/linux\n' >> "$conf"
else
  printf 'AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n' >> "$conf"
fi
changed=0
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then cp "$conf" /etc/slurm/slurm.conf; changed=1; fi

# Fast path: everything already running with this config.
if [ $changed = 0 ] && pgrep -x munged >/dev/null && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && up; then
  echo "slurm up (already): $(sinfo -h -o '%P %T %c CPUs %m MB')"
  exit 0
fi

pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force

if [ "$SLURM_ACCT" = dbd ]; then
  mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking >"$LOG/mariadb.log" 2>&1 < /dev/null &
    for i in $(seq 1 100); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf
  pgrep -x slurmdbd >/dev/null || slurmdbd
  for i in $(seq 1 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.25; done
  sacctmgr -i add cluster agentpipe >/dev/null 2>&1 || true
fi

if [ $changed = 1 ] && pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure >/dev/null 2>&1 || true
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd -N localhost
for i in $(seq 1 120); do up && break; sleep 0.25; done
# A node left DOWN/DRAINED by an unclean stop: bring it back.
if ! up; then
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  for i in $(seq 1 40); do up && break; sleep 0.25; done
fi
up || { echo "slurm_up: slurm did not come up" >&2; tail -20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true; exit 1; }
echo "slurm up: $(sinfo -h -o '%P %T %c CPUs %m MB')"
