"""The unix-socket gRPC server: socket hygiene, signals, clean shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from cvmfs_api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from .config import ServeConfig
from .core import Snapshotter
from .dispatch import ReceiveFirstExecutor
from .metrics import Metrics
from .sdnotify import notify
from .service import SnapshotsService
from .sockets import prepare_socket_path

log = logging.getLogger(__name__)


def build_server(cfg: ServeConfig, snapshotter: Snapshotter, metrics: Metrics | None) -> grpc.Server:
    # Stat runs in grpcio's serving thread, everything else in the pool (dispatch.py).
    server = grpc.server(
        ReceiveFirstExecutor(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rpc")),
        options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter, metrics), server)
    prepare_socket_path(cfg.address)
    server.add_insecure_port(f"unix:{cfg.address}")
    return server


def serve(cfg: ServeConfig, snapshotter: Snapshotter, metrics: Metrics) -> int:
    if cfg.metrics_address:
        metrics.serve(cfg.metrics_address)
    server = build_server(cfg, snapshotter, metrics)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The socket is created by start(): with this umask it is 0660 from its first moment
    # (a client may connect before the chmod below would run).
    old_umask = os.umask(0o117)
    try:
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(cfg.address, 0o660)
    log.info("serving containerd snapshots on %s (root %s)", cfg.address, cfg.root)
    # The socket accepts connections now: let systemd start containerd (Type=notify).
    notify("READY=1")
    # Wake up now and then: the kernel may deliver SIGTERM to one of gRPC's threads, and then
    # a main thread blocked in an untimed wait never runs the Python handler (seen as a
    # snapshotter ignoring SIGTERM right after start).
    while not stop.wait(0.5):
        pass
    notify("STOPPING=1")
    server.stop(grace=5).wait()
    snapshotter.close()
    try:
        os.unlink(cfg.address)
    except FileNotFoundError:
        pass
    log.info("stopped")
    return 0
