// overlayproxy serves containerd's own overlayfs snapshotter (snapshots/overlay, the
// code behind snapshotter=overlayfs) as a proxy plugin on a unix socket: the fair
// baseline for bench/rpc_bench.py, since it pays the same containerd -> socket -> gRPC
// hop as cvmfs-snapshotter. Built offline in GOPATH mode from Debian's
// golang-github-containerd-containerd-dev (bench/rpc_bench.py builds it).
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "snapshotter root directory")
	address := flag.String("address", "", "unix socket to serve on")
	flag.Parse()
	if *root == "" || *address == "" {
		fmt.Fprintln(os.Stderr, "usage: overlayproxy -root DIR -address SOCKET")
		os.Exit(2)
	}
	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "overlay:", err)
		os.Exit(1)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.Stop()
		sn.Close()
		os.Exit(0)
	}()
	if err := srv.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}
