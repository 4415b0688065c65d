#!/bin/bash
# Registers a running pod as a sandbox of the sandbox-egress daemon on its node.
#
#   register-pod.sh POD_NAMESPACE POD_NAME SANDBOX_NAME POLICY_FILE
#
# Run it on the pod's node as root, or inside the DaemonSet's pod on that node
# (kubectl exec; it has hostPID and the node's /sys/fs/cgroup). It finds the
# pod's cgroup (the directory of all its containers) and a process of the pod,
# then runs
#
#   sandbox-egress sandbox add SANDBOX_NAME --cgroup /sys/fs/cgroup/<pod> \
#       --netns /proc/<PID>/ns/net --policy POLICY_FILE
#
# (no --netns for a hostNetwork pod: it shares the daemon's namespace).
# POLICY_FILE is read by the daemon: give a path it sees (in the DaemonSet,
# /etc/sandbox-egress/policies/... from the ConfigMap).
#
# How the pod is found, first that applies:
#   POD_PID=PID        a process of the pod (its cgroup's parent is the pod's);
#   POD_UID=UID        the pod's UID (kubectl get pod -o jsonpath='{.metadata.uid}');
#   crictl             on the node: the pod sandbox's UID from `crictl inspectp`;
#   kubectl            the pod's UID from the API server.
# Other settings: SANDBOX_EGRESS (the binary, default sandbox-egress on PATH),
# SOCKET (the control socket, default the binary's), CGROUP_ROOT (default
# /sys/fs/cgroup), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail

die() {
	echo "register-pod.sh: $*" >&2
	exit 1
}

[ $# -eq 4 ] || die "usage: register-pod.sh POD_NAMESPACE POD_NAME SANDBOX_NAME POLICY_FILE"
namespace=$1
pod=$2
sandbox=$3
policy=$4
cgroup_root=${CGROUP_ROOT:-/sys/fs/cgroup}
agent=${SANDBOX_EGRESS:-sandbox-egress}

[ -r "$policy" ] || die "cannot read the policy file $policy"
policy=$(realpath -- "$policy")

# The cgroup v2 path of a process as the node sees it. A container has its own
# cgroup namespace, where /proc/PID/cgroup is relative to its own cgroup: read
# it in the node's (PID 1's, with hostPID) cgroup namespace instead.
cgroup_of_pid() {
	local line node_cgroupns
	node_cgroupns=$(readlink /proc/1/ns/cgroup 2>/dev/null || true)
	if [ -n "$node_cgroupns" ] && [ "$node_cgroupns" != "$(readlink /proc/self/ns/cgroup)" ]; then
		line=$(nsenter --cgroup=/proc/1/ns/cgroup -- cat "/proc/$1/cgroup")
	else
		line=$(cat "/proc/$1/cgroup")
	fi
	# cgroup v2: the single line "0::/path".
	line=$(printf '%s\n' "$line" | sed -n 's/^0:://p')
	[ -n "$line" ] || die "process $1 has no cgroup v2 path (is the node on cgroup v2?)"
	printf '%s\n' "$line"
}

# The pod's cgroup directory by its UID: kubelet names it pod<UID> (cgroupfs
# driver) or kubepods-<class>-pod<UID with _ for ->.slice (systemd driver).
cgroup_of_uid() {
	local uid=$1 found
	found=$(find "$cgroup_root" -maxdepth 5 -type d \( -name "pod$uid" -o -name "*-pod${uid//-/_}.slice" \) -print -quit)
	[ -n "$found" ] || die "no cgroup of pod UID $uid under $cgroup_root"
	printf '%s\n' "$found"
}

# A process anywhere in the cgroup tree at $1.
pid_in_cgroup() {
	local procs pid
	while IFS= read -r procs; do
		pid=$(head -n 1 "$procs")
		if [ -n "$pid" ]; then
			printf '%s\n' "$pid"
			return
		fi
	done < <(find "$1" -name cgroup.procs)
	die "no process in $1: is the pod running?"
}

pod_uid() {
	if [ -n "${POD_UID:-}" ]; then
		printf '%s\n' "$POD_UID"
	elif command -v crictl >/dev/null; then
		local id uid
		# --name is a regular expression: anchor it.
		id=$(crictl pods --namespace "$namespace" --name "^${pod}\$" --state ready -q | head -n 1)
		[ -n "$id" ] || die "crictl finds no ready pod $namespace/$pod on this node"
		uid=$(crictl inspectp -o go-template --template '{{.status.metadata.uid}}' "$id")
		printf '%s\n' "$uid"
	elif command -v kubectl >/dev/null; then
		kubectl get pod --namespace "$namespace" "$pod" -o 'jsonpath={.metadata.uid}'
	else
		die "set POD_PID or POD_UID: neither crictl nor kubectl is here"
	fi
}

if [ -n "${POD_PID:-}" ]; then
	pid=$POD_PID
	[ -d "/proc/$pid" ] || die "no process $pid (without hostPID, run this on the node)"
	# The container's cgroup; the pod's is its parent.
	cgroup=$(dirname "$cgroup_root$(cgroup_of_pid "$pid")")
else
	uid=$(pod_uid)
	[ -n "$uid" ] || die "no UID for pod $namespace/$pod"
	cgroup=$(cgroup_of_uid "$uid")
	pid=$(pid_in_cgroup "$cgroup")
fi
[ -d "$cgroup" ] || die "$cgroup is not a directory (is $cgroup_root the node's cgroup v2 root?)"
# Never a cgroup that is not one pod's (the root would sandbox the whole node).
case $(basename "$cgroup") in
pod*-*-*-*-* | *-pod*_*_*_*_*.slice) ;;
*) die "$cgroup is not a pod's cgroup (kubelet's pod<UID> or *-pod<UID>.slice)" ;;
esac

command=("$agent" sandbox add "$sandbox" --cgroup "$cgroup" --policy "$policy")
# A hostNetwork pod is in the node's network namespace: the daemon's own
# (hostNetwork) and this script's (on the node or in the daemon's pod).
if [ "$(readlink "/proc/$pid/ns/net")" != "$(readlink /proc/self/ns/net)" ]; then
	command+=(--netns "/proc/$pid/ns/net")
fi
if [ -n "${SOCKET:-}" ]; then
	command+=(--socket "$SOCKET")
fi

echo "register-pod.sh: pod $namespace/$pod: cgroup $cgroup, process $pid" >&2
if [ -n "${DRY_RUN:-}" ]; then
	printf '%q ' "${command[@]}"
	echo
else
	exec "${command[@]}"
fi
