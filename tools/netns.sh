#!/usr/bin/env bash
# Run a command in a network namespace of its own, with only loopback up, where we can (root and
# unshare): Ray then binds 127.0.0.1 instead of probing for this machine's public address, and a
# test browser can reach nothing but the page it opens. Elsewhere the command runs as it is.
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
    exec unshare -n bash -c 'ip link set lo up && exec "$0" "$@"' "$@"
fi
echo "tools/netns.sh: no private network namespace here (needs root, unshare and ip); running as is" >&2
exec "$@"
