"""publisher.write.singularity: /.singularity.d makes apptainer see the image's ENV, ENTRYPOINT/CMD,
WorkingDir and labels. Checked by running the generated scripts with a real shell
(busybox sh, chrooted into the tree) -- the later apptainer test runs apptainer itself."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from publisher.write.singularity import env_script, has_singularity, labels_json, sh_quote, write_singularity

from tests.fixtures.marks import needs_root

BUSYBOX = Path("/bin/busybox")

# Every kind of string a shell could mangle.
NASTY = {
    "FOO": "bar",
    "SPACES": "  two  spaces and a\ttab  ",
    "SQUOTE": "it's 'quoted'",
    "DQUOTE": 'say "hi" \\" \\\\',
    "DOLLAR": "$HOME ${PATH} $(id) $((1+1)) $",
    "BACKTICK": "`id` and ` alone",
    "NEWLINE": "line1\nline2\n\nline4\n",
    "GLOB": "* ? [a-z] ~ ~root",
    "SEMI": "a; rm -rf /tmp/nothing && echo x | cat > /dev/null &",
    "EMPTY": "",
    "EQUALS": "a=b=c",
    "UNICODE": "żółć ☃",
    "BACKSLASH_END": "ends with \\",
    "CR": "carriage\rreturn",
}
ENV = ["PATH=/custom/bin:/bin", *[f"{k}={v}" for k, v in NASTY.items()], "BARE", "not-a-name=x", "9LIVES=x"]
CONFIG = {"config": {
    "Env": ENV,
    "Entrypoint": ["/bin/sh", "-c", 'pwd; for a in "$@"; do echo "[$a]"; done', "ep0"],
    "Cmd": ["default arg", "$HOME `x` 'q'"],
    "WorkingDir": "/work dir",
    "Labels": {"org.opencontainers.image.title": "nasty", "maintainer": "Ann <a@b>"},
}}

needs_chroot = needs_root("chroot into the written tree")


def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in ("sh", "env", "echo", "pwd", "cat", "printf"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "work dir").mkdir()
    return root


def chroot(root: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/sbin/chroot", str(root), *argv], env={} if env is None else env, capture_output=True,
                          check=False)


def test_sh_quote_round_trips_every_string(tmp_path: Path) -> None:
    for value in [*NASTY.values(), "'", "''", "\\'", "-n", "-e"]:
        out = subprocess.run([str(BUSYBOX), "sh", "-c", f"printf %s {sh_quote(value)}"], capture_output=True,
                             check=True).stdout
        assert out.decode() == value


@needs_chroot
def test_env_values_round_trip_exactly(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, CONFIG)
    # as apptainer's actions do: source every env script, then run the command
    r = chroot(root, "/.singularity.d/actions/exec", "/bin/env", "-0")
    assert r.returncode == 0, r.stderr
    got = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if item)
    for name, value in NASTY.items():
        assert got[name] == value, name
    assert got["PATH"] == "/custom/bin:/bin"
    assert got["BARE"] == ""
    assert "not-a-name" not in got and "9LIVES" not in got
    assert got["LD_LIBRARY_PATH"] == "/.singularity.d/libs"
    # the single env file works on its own too (what the brief's check sources)
    r = chroot(root, "/bin/sh", "-c", ". /.singularity.d/env/10-docker2singularity.sh; env -0")
    alone = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if item)
    assert {k: alone[k] for k in NASTY} == NASTY


@needs_chroot
def test_host_values_win_except_path_as_in_apptainer(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, CONFIG)
    r = chroot(root, "/.singularity.d/actions/exec", "/bin/env", "-0",
               env={"FOO": "from host", "PATH": "/host/bin:/bin", "BARE": "kept"})
    got = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if item)
    assert got["FOO"] == "from host" and got["BARE"] == "kept" and got["PATH"] == "/custom/bin:/bin"


@needs_chroot
def test_runscript_runs_entrypoint_and_cmd_in_the_callers_dir_and_passes_args(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, CONFIG)
    r = chroot(root, "/.singularity.d/actions/run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "/\n[default arg]\n[$HOME `x` 'q']\n"  # as apptainer: no cd to WorkingDir
    # arguments replace CMD, ENTRYPOINT stays; each argument arrives as it was given
    r = chroot(root, "/.singularity.d/actions/run", "a b", "$(id)", "")
    assert r.stdout.decode() == "/\n[a b]\n[$(id)]\n[]\n"
    # apptainer's `run` goes through /.run -> actions/run; /singularity is the runscript
    assert os.readlink(root / ".run") == ".singularity.d/actions/run"
    r = chroot(root, "/singularity", "x")
    assert r.stdout.decode() == "/\n[x]\n"


@needs_chroot
@pytest.mark.parametrize("config, args, want", [
    ({"Cmd": ["/bin/echo", "cmd only"]}, [], "cmd only\n"),
    ({"Cmd": ["/bin/echo", "cmd only"]}, ["/bin/echo", "replaced"], "replaced\n"),
    ({"Entrypoint": ["/bin/echo", "ep"]}, [], "ep\n"),
    ({"Entrypoint": ["/bin/echo", "ep"]}, ["more"], "ep more\n"),
    ({"Entrypoint": "echo shell form"}, [], "shell form\n"),
    ({"WorkingDir": "/missing", "Cmd": ["/bin/pwd"]}, [], "/\n"),
])
def test_runscript_forms(tmp_path: Path, config: dict, args: list[str], want: str) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, {"config": config})
    r = chroot(root, "/.singularity.d/actions/run", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == want


@needs_chroot
def test_no_command_is_a_clear_error(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, {"config": {}})
    r = chroot(root, "/.singularity.d/actions/run")
    assert r.returncode == 1 and b"no ENTRYPOINT or CMD" in r.stderr
    assert chroot(root, "/.singularity.d/actions/run", "/bin/echo", "ok").stdout == b"ok\n"


def test_layout_labels_links_and_mount_points(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    write_singularity(root, CONFIG)
    sd = root / ".singularity.d"
    assert json.loads((sd / "labels.json").read_text()) == CONFIG["config"]["Labels"]  # (no platform in CONFIG)
    for rel in ("actions/exec", "actions/run", "actions/shell", "actions/start", "actions/test", "runscript",
                "startscript", "env/01-base.sh", "env/10-docker2singularity.sh", "env/90-environment.sh",
                "env/95-apps.sh", "env/99-base.sh", "env/99-runtimevars.sh"):
        st = os.lstat(sd / rel)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, rel
    assert (sd / "libs").is_dir()
    for link, target in ((".exec", "actions/exec"), (".shell", "actions/shell"), (".test", "actions/test"),
                         ("singularity", "runscript")):
        assert os.readlink(root / link) == ".singularity.d/" + target
    for d in ("dev", "proc", "sys", "tmp", "home", "var/tmp"):
        assert (root / d).is_dir(), d
    for f in ("etc/hosts", "etc/resolv.conf", "etc/localtime"):
        assert (root / f).is_file(), f
    assert has_singularity(root)


def test_never_writes_a_shared_inode_or_through_a_symlink(tmp_path: Path) -> None:
    """The flat tree is a hard-link copy of a chain, and the image decides its names."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "runscript").write_text("chain's inode\n")
    (outside / "hosts").write_text("127.0.0.1 chain\n")
    root = rootfs(tmp_path)
    (root / ".singularity.d").mkdir()
    os.link(outside / "runscript", root / ".singularity.d/runscript")
    (root / ".singularity.d/env").symlink_to(outside)  # would write into outside/
    (root / "etc").mkdir()
    os.link(outside / "hosts", root / "etc/hosts")
    os.symlink(str(outside), root / "home")  # a mount point that is a symlink stays one
    (root / ".singularity.d/mine").write_text("kept")
    write_singularity(root, CONFIG)
    assert (outside / "runscript").read_text() == "chain's inode\n"
    assert sorted(p.name for p in outside.iterdir()) == ["hosts", "runscript"]
    assert (root / ".singularity.d/env").is_dir() and not (root / ".singularity.d/env").is_symlink()
    assert (root / "etc/hosts").read_text() == "127.0.0.1 chain\n"  # kept, not rewritten
    assert os.lstat(root / "etc/hosts").st_ino == os.lstat(outside / "hosts").st_ino
    assert os.path.islink(root / "home")
    assert (root / ".singularity.d/mine").read_text() == "kept"


def test_env_script_is_plain_posix() -> None:
    text = env_script(["A=1", "B"])
    assert text.splitlines()[2:] == ['if [ -z "${A:-}" ]; then A=\'1\'; fi', "export A", 'B="${B:-}"', "export B"]


@needs_chroot
def test_converted_apptainer_image_runs_from_its_flat_dir(standard_images, tmp_path: Path) -> None:
    """The standard test/apptainer:v1 image through `convert-image`: its flat link, chrooted
    as apptainer would enter it, gives the image's exact Env and runs ENTRYPOINT + CMD
    (tests/apptainer runs apptainer 1.4 itself on the same image)."""
    from tests.fixtures.images import APPTAINER_ENV
    from tests.publisher.clirun import run_cli

    img = standard_images.apptainer
    root = tmp_path / "repo"
    res = run_cli("convert-image", img.ref, "--repository-root", root, "--state-db", tmp_path / "state.db")
    assert res.rc == 0, res.stdout
    link = root / img.host / "test/apptainer:v1"
    r = chroot(link, "/.singularity.d/actions/exec", "/bin/env", "-0")
    assert r.returncode == 0, r.stderr
    got = dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if item)
    assert {k: got.get(k) for k in APPTAINER_ENV} == APPTAINER_ENV
    assert got["PATH"] == "/opt/tool/bin:/usr/bin:/bin"
    assert chroot(link, "/.singularity.d/actions/exec", "hello-tool").stdout == b"hello from the tool\n"
    r = chroot(link, "/.singularity.d/actions/run")
    assert r.stdout.decode() == "cwd=/\narg=[default arg]\narg=[$HOME `x` 'q']\n", r.stderr
    r = chroot(link, "/.singularity.d/actions/run", "given arg")
    assert r.stdout.decode() == "cwd=/\narg=[given arg]\n"
    labels = json.loads((link / ".singularity.d/labels.json").read_text())
    assert labels["maintainer"] == "Ann <ann@example.org>"


def test_platform_labels_as_apptainers_build_writes_them() -> None:
    """apptainer's addBuildLabels: org.opencontainers.image.architecture (+ .variant when there
    is one) and org.label-schema.build-arch, over the image's own labels of those names."""
    cfg = {"Labels": {"a": "b", "org.opencontainers.image.architecture": "wrong"}}
    got = json.loads(labels_json(cfg, {"architecture": "arm64", "variant": "v8", "os": "linux"}))
    assert got == {"a": "b", "org.opencontainers.image.architecture": "arm64",
                   "org.opencontainers.image.variant": "v8", "org.label-schema.build-arch": "arm64"}
    assert json.loads(labels_json(cfg, {"architecture": "amd64"}))["org.label-schema.build-arch"] == "amd64"
    assert "org.opencontainers.image.variant" not in json.loads(labels_json(cfg, {"architecture": "amd64"}))
    assert json.loads(labels_json({}, {})) == {}  # a config without a platform: nothing invented
