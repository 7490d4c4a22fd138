#!/usr/bin/env bash
# Stop the throwaway Ceph started by ceph-rgw-up.sh DIR (radosgw, osd, mon) and remove DIR.
set -u
D=${1:-/tmp/ceph}
for f in "$D"/run/*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null; done
sleep 1
for f in "$D"/run/*.pid; do [[ -f $f ]] && kill -9 "$(cat "$f")" 2>/dev/null; done
rm -rf "$D"
