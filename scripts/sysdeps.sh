#!/usr/bin/env bash
# The system packages the test suite uses: Chromium renders the leaderboard page, Debian's
# dataset-fashion-mnist is real data one loader reads, SLURM (slurmctld, slurmd, munge and the
# clients) runs the sweeps of tests/test_slurm.py on a one-node cluster the tests start and stop
# (no service is enabled or configured here). Installed when this user can (root, or sudo without a
# password); otherwise stop with the exact command, before any test runs.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need+=(slurmd)
[ -x /usr/sbin/munged ] || need+=(munge)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
[ ${#need[@]} -eq 0 ] && exit 0
install="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${need[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: the tests need ${need[*]} (Debian package names); install them with this system's package manager" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  echo "installing ${need[*]} (system packages the tests use)"
  sh -c "$install" >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "installing ${need[*]} with sudo (system packages the tests use)"
  sudo sh -c "$install" >/dev/null
else
  echo "error: the tests need the system packages ${need[*]}; install them, then run make test again:" >&2
  echo "  sudo sh -c '$install'" >&2
  exit 1
fi
