#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# The cluster demo: sets everything up (resources/setup.sh), then runs
# target/x86_64-unknown-linux-gnu/release/vmm-cluster-demo: a 3-member etcd, hosts a, b and c
# (network namespaces on one segment, 0.6 CPU each through a cgroup, a host agent each), six VMs
# of our guest placed by `vmm vm create`, a client streaming to each VM's echo service,
# `vmm cluster status`, `vmm host drain a` while the clients stream, the status again and a
# summary per VM. It exits non-zero if a line was lost and
# removes everything it started (etcd, agents, VMs, namespaces, cgroups). Extra arguments go to
# the demo (`--vms N`, `--mem-mib N`).
#
# Usage: resources/cluster-demo.sh [--vms N] [--mem-mib N]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
exec "$(dirname "$here")/target/x86_64-unknown-linux-gnu/release/vmm-cluster-demo" "$@"
