"""Pulls through the snapshotter other than `ctr image pull`: our `cvmfs-snapshotter pull`
and a Kubernetes-style CRI PullImage."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc

from cvmfs_api.cri.runtime.v1 import api_pb2, api_pb2_grpc

SNAPSHOTTER_BIN = Path(sys.executable).with_name("cvmfs-snapshotter")


def cvmfs_pull(cd, ref: str, namespace: str = "default") -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(SNAPSHOTTER_BIN), "pull", "--containerd-address", str(cd.address), "--namespace", namespace,
         "--plain-http", ref],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"pull failed: {res.stdout}\n{res.stderr}"
    return res


def cri_pull(address, image: str) -> str:
    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = api_pb2_grpc.ImageServiceStub(channel)
        resp = stub.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=300)
    return resp.image_ref
