"""A kubelet's part, as far as the tests need it: CRI calls to the containerd of a Stack,
from the host through the container's root (/proc/<pid>/root/run/containerd/...).

Pods get a network namespace from a no-op CNI plugin (install_noop_cni: loopback only, the
address reported but never configured): containerd pins a pod's user namespace to it, so a
user-namespaced pod cannot use the host network. Logs go under /w/pods, so a container's
output is read on the host once it has exited."""
from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cvmfs_api.cri.runtime.v1 import api_pb2 as cri
from cvmfs_api.cri.runtime.v1 import api_pb2_grpc
from tests.fixtures.rootfs import PODMAN

from .stack import CD_SOCKET, Stack

TIMEOUT = 300
# A CNI plugin that makes nothing and reports an address (containerd requires one on eth0).
NOOP_CNI = r"""#!/bin/sh
conf=$(cat)
ver=$(printf '%s' "$conf" | sed -n 's/.*"cniVersion" *: *"\([^"]*\)".*/\1/p')
case "$CNI_COMMAND" in
ADD)
  if [ "$CNI_IFNAME" = lo ]; then ips='[]'; else ips='[{"version":"4","address":"10.88.0.2/16","interface":0}]'; fi
  printf '{"cniVersion":"%s","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":%s}' "$ver" "$CNI_IFNAME" "$CNI_NETNS" "$ips" ;;
VERSION)
  printf '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}' ;;
esac
exit 0
"""
NOOP_CNI_CONF = '{"cniVersion": "1.0.0", "name": "noop", "plugins": [{"type": "noop"}]}'


def install_noop_cni(c) -> None:
    """Into the container `c`, before containerd starts."""
    c.exec(f"mkdir -p /opt/cni/bin /etc/cni/net.d && cat > /opt/cni/bin/noop <<'__EOF__'\n{NOOP_CNI}__EOF__\n"
           f"echo '{NOOP_CNI_CONF}' > /etc/cni/net.d/10-noop.conflist && "
           "chmod 755 /opt/cni/bin/noop && ln -sf noop /opt/cni/bin/loopback")


@dataclass(frozen=True)
class UserNs:
    """A pod's user namespace: container ids 0..size-1 on host ids uid/gid..+size."""
    uid: int = 100000
    gid: int = 200000
    size: int = 65536

    def pb(self) -> cri.UserNamespace:
        return cri.UserNamespace(mode=cri.POD,
                                 uids=[cri.IDMapping(host_id=self.uid, container_id=0, length=self.size)],
                                 gids=[cri.IDMapping(host_id=self.gid, container_id=0, length=self.size)])


@dataclass
class Pod:
    id: str
    config: cri.PodSandboxConfig
    userns: UserNs | None
    log_dir: Path                          # on the host
    containers: list[str] = field(default_factory=list)


class Cri:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        pid = subprocess.run([*PODMAN, "inspect", "-f", "{{.State.Pid}}", stack.c.name], check=True,
                             capture_output=True, text=True).stdout.strip()
        self.channel = grpc.insecure_channel(f"unix:/proc/{pid}/root{CD_SOCKET}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def pull(self, ref: str) -> str:
        req = cri.PullImageRequest(image=cri.ImageSpec(image=ref))
        return self.images.PullImage(req, timeout=TIMEOUT).image_ref

    def _ns(self, userns: UserNs | None) -> cri.NamespaceOption:
        return cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD,
                                   userns_options=userns.pb() if userns else None)

    def run_pod(self, name: str, userns: UserNs | None = None) -> Pod:
        uid = uuid.uuid4().hex[:12]
        log_dir = f"/w/pods/{name}-{uid}"
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="test"),
            hostname=name, log_directory=log_dir,
            linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=self._ns(userns))))
        pod_id = self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=TIMEOUT).pod_sandbox_id
        return Pod(pod_id, config, userns, self.stack.c.host_w / log_dir.removeprefix("/w/"))

    def create(self, pod: Pod, name: str, image: str, command: list[str],
               mounts: list[cri.Mount] = ()) -> str:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=image),
            command=command, log_path=f"{name}.log", mounts=list(mounts),
            linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                namespace_options=self._ns(pod.userns))))
        req = cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config)
        cid = self.runtime.CreateContainer(req, timeout=TIMEOUT).container_id
        pod.containers.append(cid)
        return cid

    def start(self, cid: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=TIMEOUT)

    def wait_exit(self, cid: str, timeout: float = 120) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=30).status
            if st.state == cri.CONTAINER_EXITED:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"container {cid} still {cri.ContainerState.Name(st.state)}")
            time.sleep(0.2)

    def output(self, pod: Pod, name: str) -> str:
        """The container's stdout and stderr, CRI log prefixes (time stream tag) removed."""
        text = (pod.log_dir / f"{name}.log").read_text(errors="replace")
        return "\n".join(line.split(" ", 3)[3] for line in text.splitlines() if line.count(" ") >= 3)

    def run(self, pod: Pod, name: str, image: str, command: list[str],
            mounts: list[cri.Mount] = ()) -> tuple[cri.ContainerStatus, str]:
        """Create, start, wait for the exit; (status, output)."""
        cid = self.create(pod, name, image, command, mounts)
        self.start(cid)
        st = self.wait_exit(cid)
        return st, self.output(pod, name)

    def remove_pod(self, pod: Pod) -> None:
        for cid in pod.containers:
            self.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=5), timeout=TIMEOUT)
            self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=TIMEOUT)
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=TIMEOUT)
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=TIMEOUT)
