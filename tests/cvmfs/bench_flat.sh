#!/bin/bash
# .flat by template transaction vs hard-link copy on a real stratum 0 (docs/cvmfs-backend.md).
# Inside the tests/cvmfs container, repository R made by `cvmfs_server mkfs`:
#   R=REPO SRC=/opt/venv bash bench_flat.sh N     (N: a fresh suffix per run)
set -e
R=${R:?set R=REPO}; SRC=${SRC:-/opt/venv}
t() { local s=$(date +%s.%N); "$@" >/tmp/bench.out 2>&1 || { echo "FAILED: $*"; cat /tmp/bench.out; exit 1; }; awk -v a="$s" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }'; }
tx() { cvmfs_server transaction "$@"; }
pub() { cvmfs_server publish $R; }
n=$1
# S1: a new chain and its flat dir
a1=$(t tx $R); a2=$(t sh -c "mkdir -p /cvmfs/$R/.chains/c$n && cp -a $SRC /cvmfs/$R/.chains/c$n/rootfs && touch /cvmfs/$R/.chains/c$n/.cvmfscatalog")
a3=$(t sh -c "mkdir -p /cvmfs/$R/.flat/f$n && cp -al /cvmfs/$R/.chains/c$n/rootfs /cvmfs/$R/.flat/f$n/rootfs && touch /cvmfs/$R/.flat/f$n/.cvmfscatalog")
a4=$(t pub)
echo "S1 hardlink: txn $a1 chain-write $a2 flat-cp-al $a3 publish $a4"
b1=$(t tx $R); b2=$(t sh -c "mkdir -p /cvmfs/$R/.chains/d$n && cp -a $SRC /cvmfs/$R/.chains/d$n/rootfs && touch /cvmfs/$R/.chains/d$n/.cvmfscatalog")
b3=$(t pub); b4=$(t tx -T /.chains/d$n=/.flat/g$n $R); b5=$(t pub)
echo "S1 template: txn $b1 chain-write $b2 publish $b3 txn-T $b4 publish $b5"
# S2: the chain is published already (a second image on the same chain)
c1=$(t tx $R); c2=$(t sh -c "mkdir -p /cvmfs/$R/.flat/h$n && cp -al /cvmfs/$R/.chains/c$n/rootfs /cvmfs/$R/.flat/h$n/rootfs && touch /cvmfs/$R/.flat/h$n/.cvmfscatalog"); c3=$(t pub)
echo "S2 hardlink: txn $c1 flat-cp-al $c2 publish $c3"
d1=$(t tx -T /.chains/c$n=/.flat/i$n $R); d2=$(t pub)
echo "S2 template: txn-T $d1 publish $d2"
