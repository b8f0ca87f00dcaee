"""``/.singularity.d`` in a flat root fs: what apptainer reads from a sandbox (docs/DESIGN.md#apptainer).

Apptainer takes an image's environment, runscript and labels ONLY from this directory:
without it ``apptainer exec`` gets apptainer's default PATH and none of the image's ENV,
and ``apptainer run`` starts /bin/sh. We write what apptainer's own OCI -> sandbox
conversion (and DUCC's ``ducc/singularity``) writes::

    .singularity.d/env/10-docker2singularity.sh   the config's Env, single-quoted
    .singularity.d/runscript                      ENTRYPOINT + CMD, args
    .singularity.d/labels.json                    the config's Labels + its platform (as apptainer's build)
    .singularity.d/actions/{exec,run,shell,start,test}, env/{01-base,90-environment,
    95-apps,99-base,99-runtimevars}.sh, startscript, libs/
    /.exec /.run /.shell /.test /singularity /environment   links (when the image has none)
    /dev /proc /sys /tmp /var/tmp /home /root /etc/{hosts,resolv.conf}   mount points
    (and /etc/localtime) apptainer binds over, created when missing

The tree is a hard-link copy of a chain: an existing file is never written to (that
would edit the chain's inode), only unlinked and created anew. Every step works on
directory fds with O_NOFOLLOW: a symlink the image planted (``/.singularity.d ->
/etc``) is replaced, never followed out of the tree.

Differences from apptainer, on purpose: Env values and ENTRYPOINT/CMD words are
single-quoted, so every string round-trips (apptainer 1.4.5's own conversion writes
``"${X:-…}"`` with an escaping that double-escapes quotes and, with a backtick in any
value, makes the whole file fail to source: the image's Env is then lost); the runscript
runs the command as an OCI runtime would (apptainer's ``--no-eval``). Like apptainer's
conversion it does not change to WorkingDir: jobs pass paths relative to their own
directory, which apptainer keeps (``apptainer run --pwd DIR`` for WorkingDir).
Env entries whose names are not shell identifiers are left out (they cannot be
exported by ``sh``; a failing ``export`` would stop the sourcing shell).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from cvmfs_common.fsutil.atomic import lexists_at

log = logging.getLogger(__name__)

SINGULARITY_DIR = ".singularity.d"
ENV_FILE = "env/10-docker2singularity.sh"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SOURCE_ENV = """for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
"""


def _app_or_image_action(script: str, missing_app: str, fallback: str) -> str:
    """``actions/run`` and ``actions/test``: the selected SCIF app's script, else the
    image's, else ``fallback`` (what apptainer's own actions do)."""
    return "#!/bin/sh\n" + _SOURCE_ENV + f"""
app="${{APPTAINER_APPNAME:-${{SINGULARITY_APPNAME:-}}}}"
if [ -n "$app" ]; then
    if [ -x "/scif/apps/$app/scif/{script}" ]; then
        exec "/scif/apps/$app/scif/{script}" "$@"
    fi
    echo "{missing_app}: $app" >&2
    exit 1
elif [ -x /.singularity.d/{script} ]; then
    exec /.singularity.d/{script} "$@"
fi
{fallback}"""


# -- the fixed files (behaviour as apptainer's, our own text) ------------------------------
_ACTIONS = {
    "exec": "#!/bin/sh\n" + _SOURCE_ENV + 'exec "$@"\n',
    "run": _app_or_image_action("runscript", "No runscript for contained app",
                                'echo "No runscript found, executing /bin/sh"\nexec /bin/sh "$@"\n'),
    "shell": "#!/bin/sh\n" + _SOURCE_ENV + """
user_shell="${APPTAINER_SHELL:-${SINGULARITY_SHELL:-}}"
if [ -n "$user_shell" ] && [ -x "$user_shell" ]; then
    exec $user_shell "$@"
elif [ -x /bin/bash ]; then
    SHELL=/bin/bash
    PS1="Apptainer> "
    export SHELL PS1
    exec /bin/bash --norc "$@"
elif [ -x /bin/sh ]; then
    SHELL=/bin/sh
    export SHELL
    exec /bin/sh "$@"
fi
echo "ERROR: no shell in the container" >&2
exit 1
""",
    "start": "#!/bin/sh\n# Tell the instance's PID 1 to go on (apptainer waits for this signal).\nkill -CONT 1\n"
             + _SOURCE_ENV + """
if [ -x /.singularity.d/startscript ]; then
    exec /.singularity.d/startscript
fi
""",
    "test": _app_or_image_action("test", "No tests for contained app",
                                 'echo "No test found in container, executing /bin/sh -c true"\n'
                                 "exec /bin/sh -c true\n"),
}

_ENV_FILES = {
    "01-base.sh": "#!/bin/sh\n# Base environment (nothing to set for converted OCI images).\n",
    "90-environment.sh": "#!/bin/sh\n# Custom environment shell code should follow\n",
    "95-apps.sh": """#!/bin/sh
# SCIF apps: put the selected app's bin and lib first.
app="${APPTAINER_APPNAME:-${SINGULARITY_APPNAME:-}}"
if [ -n "$app" ]; then
    if [ ! -d "/scif/apps/$app/" ]; then
        echo "Could not locate the container application: $app" >&2
        exit 1
    fi
    SCIF_APPS=/scif/apps
    SCIF_APPROOT="/scif/apps/$app"
    export SCIF_APPS SCIF_APPROOT
    PATH="/scif/apps/$app:$PATH"
    if [ -d "/scif/apps/$app/bin" ]; then
        PATH="/scif/apps/$app/bin:$PATH"
    fi
    if [ -d "/scif/apps/$app/lib" ]; then
        LD_LIBRARY_PATH="/scif/apps/$app/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
    fi
    for f in 01-base.sh 90-environment.sh; do
        if [ -f "/scif/apps/$app/scif/env/$f" ]; then
            . "/scif/apps/$app/scif/env/$f"
        fi
    done
    export PATH
fi
""",
    "99-base.sh": """#!/bin/sh
LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/.singularity.d/libs"
PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
""",
    "99-runtimevars.sh": """#!/bin/sh
# apptainer --env PATH=... / APPTAINERENV_PREPEND_PATH / _APPEND_PATH arrive here.
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PREPEND_PATH:$PATH"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="$PATH:$SING_USER_DEFINED_APPEND_PATH"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="$SING_USER_DEFINED_PATH"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
""",
}

_TOP_LINKS = {
    ".exec": ".singularity.d/actions/exec",
    ".run": ".singularity.d/actions/run",
    ".shell": ".singularity.d/actions/shell",
    ".test": ".singularity.d/actions/test",
    "singularity": ".singularity.d/runscript",
    "environment": ".singularity.d/env/90-environment.sh",
}
_MOUNT_DIRS = (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777), ("home", 0o755),
               ("root", 0o700), ("etc", 0o755), ("var", 0o755), ("var/tmp", 0o1777))
_MOUNT_FILES = ("etc/hosts", "etc/resolv.conf", "etc/localtime")


def sh_quote(value: str) -> str:
    """``'…'`` with every ``'`` as ``'"'"'``: any string (newlines, ``$``, backticks,
    quotes) comes back unchanged from every POSIX shell and from the Go shell apptainer
    sources env files with (its mvdan/sh keeps the backslash of the usual ``'\\''``:
    ``it'\\''s`` arrives as ``it\\'s``, seen with apptainer 1.4.5)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def env_script(env: Sequence[object]) -> str:
    """``env/10-docker2singularity.sh`` for a config's ``Env`` list.

    As apptainer: PATH is set, every other variable only when the host did not set it
    (``${X:-value}`` semantics), a bare ``NAME`` keeps the host's value or empty."""
    lines = ["#!/bin/sh", "# The image's Env (OCI config), written by cvmfs-publisher."]
    for item in env:
        if not isinstance(item, str):
            continue
        name, has_value, value = item.partition("=")
        if "\x00" in item:
            lines.append("# left out: a variable with a NUL byte")
            continue
        if not _NAME_RE.fullmatch(name):
            lines.append(f"# left out: {sh_quote(name)} is not a shell variable name".replace("\n", " "))
            continue
        if not has_value:
            lines.append(f'{name}="${{{name}:-}}"')
        elif name == "PATH":
            lines.append(f"{name}={sh_quote(value)}")
        else:
            lines.append(f'if [ -z "${{{name}:-}}" ]; then {name}={sh_quote(value)}; fi')
        lines.append(f"export {name}")
    return "\n".join(lines) + "\n"


def _words(value: object) -> list[str]:
    if isinstance(value, list):
        return [w for w in value if isinstance(w, str)]
    if isinstance(value, str) and value:  # Docker's old string form: /bin/sh -c
        return ["/bin/sh", "-c", value]
    return []


def runscript(config: dict) -> str:
    """``runscript``: ENTRYPOINT + CMD, arguments replacing CMD (as ``docker run``), in
    the caller's directory as apptainer's own conversion runs it (WorkingDir is named in a
    comment: ``apptainer run --pwd DIR`` gives it)."""
    entrypoint, cmd = _words(config.get("Entrypoint")), _words(config.get("Cmd"))
    workdir = config.get("WorkingDir")
    lines = ["#!/bin/sh", "# ENTRYPOINT + CMD of the image (OCI config), written by cvmfs-publisher."]
    if isinstance(workdir, str) and workdir:
        shown = sh_quote(workdir).replace("\n", "\\n")
        lines.append(f"# WorkingDir {shown}: apptainer starts in the caller's directory; "
                     "`apptainer run --pwd DIR` changes it.")
    if cmd:
        lines.append('if [ "$#" -eq 0 ]; then')
        lines.append("    set -- " + " ".join(sh_quote(w) for w in cmd))
        lines.append("fi")
    if entrypoint:
        lines.append("set -- " + " ".join(sh_quote(w) for w in entrypoint) + ' "$@"')
    lines.append('if [ "$#" -eq 0 ]; then')
    lines.append('    echo "The image has no ENTRYPOINT or CMD: give a command" >&2')
    lines.append("    exit 1")
    lines.append("fi")
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


# What apptainer's build adds for the platform it built (internal/pkg/build/metadata.go
# addBuildLabels: build-arch since 1.x, architecture and variant in 1.5's successor), over the
# image's own labels of the same name.
ARCH_LABEL = "org.opencontainers.image.architecture"
VARIANT_LABEL = "org.opencontainers.image.variant"
BUILD_ARCH_LABEL = "org.label-schema.build-arch"


def platform_labels(image_config: dict) -> dict[str, str]:
    """The platform labels of an image whose config states its architecture (every image of a
    multi-platform index does). Not base.name/base.digest: a flat dir is shared by every tag
    with this config, so nothing per tag goes into it; not the build dates (not reproducible)."""
    arch = image_config.get("architecture")
    if not isinstance(arch, str) or not arch:
        return {}
    labels = {ARCH_LABEL: arch, BUILD_ARCH_LABEL: arch}
    variant = image_config.get("variant")
    if isinstance(variant, str) and variant:
        labels[VARIANT_LABEL] = variant
    return labels


def labels_json(config: dict, image_config: dict | None = None) -> str:
    """``config``: the image config's ``config`` object (its Labels); ``image_config``: the
    whole image config (its platform, platform_labels)."""
    labels = config.get("Labels")
    if not isinstance(labels, dict):
        labels = {}
    out = {str(k): str(v) for k, v in labels.items()}
    out.update(platform_labels(image_config or {}))
    return json.dumps(out, indent="\t", sort_keys=True) + "\n"


@dataclass
class SingularityStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    replaced: list[str] = field(default_factory=list)  # image entries we had to replace


class _Writer:
    """fd-relative, O_NOFOLLOW writes below a root fd; owners root (the chains' are kept)."""

    def __init__(self, root_fd: int, stats: SingularityStats) -> None:
        self.root_fd = root_fd
        self.stats = stats

    def dir(self, rel: str, mode: int, *, replace_other: bool = True) -> int | None:
        """fd of directory ``rel`` (created when missing); None if something else is there
        and ``replace_other`` is False. The caller closes the fd."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(rel.split("/")):
                sub = "/".join(rel.split("/")[: i + 1])
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, mode if sub == rel else 0o755)
                    self.stats.dirs += 1
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not replace_other:
                        os.close(fd)
                        return None
                    os.unlink(comp, dir_fd=fd)  # a symlink or file the image has there
                    self.stats.replaced.append(sub)
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, mode if sub == rel else 0o755)
                    self.stats.dirs += 1
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def file(self, dir_fd: int, name: str, text: str, mode: int, rel: str) -> None:
        """A new inode with ``text`` (an existing entry -- maybe a chain's inode -- is unlinked)."""
        if lexists_at(dir_fd, name):
            _remove_at(dir_fd, name)
            self.stats.replaced.append(rel)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            data = text.encode("utf-8", "surrogateescape")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        self.stats.files += 1

    def link_if_missing(self, name: str, target: str) -> None:
        if not lexists_at(self.root_fd, name):
            os.symlink(target, name, dir_fd=self.root_fd)
            self.stats.links += 1


def _remove_at(dir_fd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            _remove_at(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def write_singularity(root: "os.PathLike[str] | str", config: dict) -> SingularityStats:
    """Add ``/.singularity.d`` etc. to the flat tree at ``root`` for the image ``config``
    (the whole config JSON, or None/{} for an image without one)."""
    cfg = config.get("config") if isinstance(config, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    stats = SingularityStats()
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        w = _Writer(root_fd, stats)
        # A .singularity.d the image ships (e.g. built from a sandbox): ours replaces the
        # files we write, its other files stay (as apptainer's conversion keeps them).
        for sub in ("actions", "env", "libs"):
            fd = w.dir(f"{SINGULARITY_DIR}/{sub}", 0o755)
            assert fd is not None
            try:
                if sub == "actions":
                    for name, text in _ACTIONS.items():
                        w.file(fd, name, text, 0o755, f"{SINGULARITY_DIR}/actions/{name}")
                elif sub == "env":
                    for name, text in _ENV_FILES.items():
                        w.file(fd, name, text, 0o755, f"{SINGULARITY_DIR}/env/{name}")
                    w.file(fd, os.path.basename(ENV_FILE), env_script(cfg.get("Env") or []), 0o755,
                           f"{SINGULARITY_DIR}/{ENV_FILE}")
            finally:
                os.close(fd)
        fd = w.dir(SINGULARITY_DIR, 0o755)
        assert fd is not None
        try:
            w.file(fd, "runscript", runscript(cfg), 0o755, f"{SINGULARITY_DIR}/runscript")
            w.file(fd, "startscript", "#!/bin/sh\n", 0o755, f"{SINGULARITY_DIR}/startscript")
            w.file(fd, "labels.json", labels_json(cfg, config if isinstance(config, dict) else None), 0o644,
                   f"{SINGULARITY_DIR}/labels.json")
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
        for name, target in _TOP_LINKS.items():
            w.link_if_missing(name, target)
        # Mount points apptainer binds over (it cannot create them in a read-only image).
        for rel, mode in _MOUNT_DIRS:
            fd = w.dir(rel, mode, replace_other=False)
            if fd is not None:
                os.close(fd)
        for rel in _MOUNT_FILES:
            parent, name = rel.rsplit("/", 1)
            fd = w.dir(parent, 0o755, replace_other=False)
            if fd is None:
                continue
            try:
                if not lexists_at(fd, name):  # a symlink (localtime -> zoneinfo) stays as it is
                    w.file(fd, name, "", 0o644, rel)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    if stats.replaced:
        log.info("flat tree %s: replaced the image's %s", root, ", ".join(stats.replaced[:10]))
    return stats


def has_singularity(root: "os.PathLike[str] | str") -> bool:
    """Is the tree's ``/.singularity.d`` there (a tree older versions wrote lacks it)?"""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(root, SINGULARITY_DIR, ENV_FILE)).st_mode)
    except OSError:
        return False


__all__ = ["SINGULARITY_DIR", "SingularityStats", "env_script", "has_singularity", "labels_json", "runscript",
           "sh_quote", "write_singularity"]
