#!/usr/bin/env bash
# Makes sure Slurm (slurmctld, slurmd and the client commands) is installed, for the local test
# cluster in cluster/testing/local_cluster.py. Idempotent: does nothing when Slurm is already there.
# Installs from apt only when it has to, and only as root on a system with apt-get (CI: Debian 12).
# Exit status 0 when Slurm is available afterwards; otherwise non-zero with a one-line reason on
# stderr (the test fixture skips the Slurm tests with that line).
set -u

missing() {
    local cmd
    for cmd in slurmctld slurmd sbatch srun sinfo scontrol scancel squeue; do
        # slurmctld/slurmd live in /usr/sbin, which a non-login PATH may lack.
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || echo "$cmd"
    done
}

need=$(missing)
[ -z "$need" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "Slurm is not installed (missing: $(echo $need)) and we are not root to apt-get it" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "Slurm is not installed (missing: $(echo $need)) and there is no apt-get to install it" >&2
    exit 1
fi

log=$(mktemp -t install-slurm.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client; } >"$log" 2>&1; then
    echo "apt-get install of slurmctld slurmd slurm-client failed: $(tail -n 1 "$log")" >&2
    exit 1
fi
# Debian's packages start (and enable) the system's own slurmctld/slurmd services where systemd
# runs; the test cluster uses its own configuration and ports, so those are harmless either way.

need=$(missing)
if [ -n "$need" ]; then
    echo "Slurm still incomplete after apt-get install (missing: $(echo $need))" >&2
    exit 1
fi
rm -f "$log"
exit 0
