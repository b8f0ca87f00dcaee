"""Apptainer 1.4 (Debian sid) runs the published `.flat` link as it runs its own sandbox build.

Two images. `test/apptainer-plain` has values apptainer's own OCI conversion handles, and the
flat link is judged against `apptainer build --sandbox` of it from the same registry: the same
environment, the same `run` output with and without arguments, the image's labels.
`test/apptainer` carries values that conversion mangles (a backtick in one value makes
apptainer 1.4.5 drop the whole Env; quotes come out double-escaped), so there the image config
itself is the oracle: every value byte for byte. The `.multiarch/<uname -m>` alias path runs
too. apptainer runs as an ordinary user inside a privileged sid container (as root it asks
for more capabilities than podman grants a container).
"""
from __future__ import annotations

import json
import platform
import shlex
from pathlib import Path

import pytest

from tests.fixtures.images import (APPTAINER_CONFIG, APPTAINER_ENV, BuiltImage, Pusher, StandardImages,
                                   apptainer_layers, host_arch)
from tests.fixtures.oci_layout import ImageConfig, OciLayout, Platform
from tests.fixtures.rootfs import SID, RootfsContainer, RootfsUnavailable, start_container, stop_container
from tests.publisher.clirun import run_cli

pytestmark = pytest.mark.e2e

USER = "user"
REF = f"/home/{USER}/ref"  # apptainer builds beside its target: a dir the user owns
# What the checks print: every image variable NUL-terminated, so newlines survive the trip.
ENV_NAMES = ["PATH", *APPTAINER_ENV]
PRINT_ENV = "printf '%s\\0' " + " ".join(f'"${{{n}}}"' for n in ENV_NAMES)


# Everything apptainer's own conversion gets right: spaces, '=', a custom PATH, args.
PLAIN_CONFIG = ImageConfig(
    entrypoint=["/bin/sh", "-c", 'echo "cwd=$(pwd)"; for a in "$@"; do echo "arg=[$a]"; done', "entrypoint"],
    cmd=["default arg", "second"],
    env=["PATH=/opt/tool/bin:/usr/bin:/bin", "FOO=bar baz", "KV=a=b", "EMPTY="],
    working_dir="/work dir",
    labels={"org.opencontainers.image.title": "apptainer plain", "maintainer": "Ann <ann@example.org>"},
    platform=Platform("linux", host_arch()),
)


def _push_plain(host: str, work: Path) -> BuiltImage:
    layers = apptainer_layers()
    oci = OciLayout(work / "layout")
    oci.tag("plain", oci.add_image(layers, PLAIN_CONFIG))
    pusher = Pusher(host)
    pusher.copy(oci.root, "plain", "test/apptainer-plain", "v1")
    return pusher.describe("test/apptainer-plain", "v1", layer_tars=[layer.tar for layer in layers])


@pytest.fixture(scope="module")
def sid_apptainer(e2e_base: Path, registry, standard_images: StandardImages):
    """(container, nasty image, plain image): both converted on the host into /w/repo, the
    plain one also built by apptainer as the reference sandbox REF."""
    try:
        c = start_container(SID, e2e_base, "rf-app-")
    except RootfsUnavailable as e:
        pytest.skip(str(e))
    try:
        c.exec(f"useradd -m -u 1000 {USER}")
        nasty, plain = standard_images.apptainer, _push_plain(registry.host, c.workdir)
        for img in (nasty, plain):
            res = run_cli("convert-image", img.ref, "--repository-root", c.host_w / "repo",
                          "--state-db", c.workdir / "state.db")
            assert res.rc == 0, res.stdout
        c.exec(f"cd /home/{USER} && apptainer build --no-https --sandbox {REF} docker://{plain.ref}",
               user=USER, timeout=600)
        yield c, nasty, plain
    finally:
        stop_container(c)


def _link(img: BuiltImage) -> str:
    return f"/w/repo/{img.host}/{img.name}:{img.tag}"


def _app(c: RootfsContainer, args: str) -> str:
    r = c.exec(f"cd /home/{USER} && apptainer {args}", user=USER)
    return r.stdout


def _env_of(c: RootfsContainer, target: str) -> dict[str, str]:
    """The image variables exactly (NUL-separated, so newlines survive)."""
    out = _app(c, f"exec --cleanenv {target} /bin/sh -c {shlex.quote(PRINT_ENV)}")
    values = out.split("\0")[:-1]
    assert len(values) == len(ENV_NAMES), out
    return dict(zip(ENV_NAMES, values))


def _full_env(c: RootfsContainer, target: str) -> dict[str, str]:
    """`env` inside, less what names the container itself."""
    lines = _app(c, f"exec --cleanenv {target} env").splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    for k in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "APPTAINER_NAME", "SINGULARITY_NAME"):
        env.pop(k)
    return env


def _image_env_seen(config: ImageConfig, env: dict[str, str]) -> dict[str, str]:
    """The image's variables as seen inside. apptainer appends its default PATH entries
    (its own conversion likewise): the image's PATH must come first, unchanged."""
    image_path = dict(e.split("=", 1) for e in config.env)["PATH"]
    seen = {k: env.get(k) for k in (e.split("=", 1)[0] for e in config.env)}
    if seen["PATH"] and seen["PATH"].startswith(image_path + ":"):
        seen["PATH"] = image_path
    return seen


def test_flat_link_has_singularity_d_and_is_a_directory(sid_apptainer):
    c, nasty, _ = sid_apptainer
    link = c.host_w / "repo" / nasty.host / f"{nasty.name}:{nasty.tag}"
    assert link.is_symlink() and not Path(str(link.readlink())).is_absolute()
    flat = link.resolve()
    assert flat.is_dir() and not flat.is_symlink()
    for rel in ("env/10-docker2singularity.sh", "runscript", "labels.json", "actions/exec", "actions/run"):
        assert (flat / ".singularity.d" / rel).exists(), rel


def test_exec_environment_equals_sandbox_build(sid_apptainer):
    c, _, plain = sid_apptainer
    ours, ref = _full_env(c, _link(plain)), _full_env(c, REF)
    assert ours == ref
    assert _image_env_seen(PLAIN_CONFIG, ours) == dict(e.split("=", 1) for e in PLAIN_CONFIG.env)


def test_exec_environment_round_trips_every_value(sid_apptainer):
    c, nasty, _ = sid_apptainer
    ours = _env_of(c, _link(nasty))
    assert _image_env_seen(APPTAINER_CONFIG, ours) == dict(e.split("=", 1) for e in APPTAINER_CONFIG.env)
    assert _app(c, f"exec --cleanenv {_link(nasty)} hello-tool").strip() == "hello from the tool"


def test_host_variables_are_treated_as_by_the_sandbox_build(sid_apptainer):
    c, _, plain = sid_apptainer
    show = "/bin/sh -c 'echo \"$FOO|$PATH\"'"
    ours, ref = (c.exec(f"cd /home/{USER} && FOO=host PATH=/host/bin:$PATH apptainer exec {t} {show}",
                        user=USER).stdout for t in (_link(plain), REF))
    assert ours == ref


def test_run_equals_sandbox_build(sid_apptainer):
    c, _, plain = sid_apptainer
    ours, ref = _app(c, f"run --cleanenv {_link(plain)}"), _app(c, f"run --cleanenv {REF}")
    assert ours == ref
    assert "arg=[default arg]\narg=[second]" in ours
    args = "'one two' '' three"  # (apptainer's runscript evaluates `$`: ours, as --no-eval, does not)
    ours, ref = _app(c, f"run --cleanenv {_link(plain)} {args}"), _app(c, f"run --cleanenv {REF} {args}")
    assert ours == ref
    assert "arg=[one two]\narg=[]\narg=[three]" in ours and "default arg" not in ours


def test_run_passes_nasty_arguments_and_cmd_exactly(sid_apptainer):
    c, nasty, _ = sid_apptainer
    out = _app(c, f"run --cleanenv {_link(nasty)}")
    assert [f"arg=[{a}]" for a in APPTAINER_CONFIG.cmd] == out.splitlines()[1:]
    out = _app(c, f"run --cleanenv {_link(nasty)} 'it'\\''s' '`id`' '$(id)'")
    assert out.splitlines()[1:] == ["arg=[it's]", "arg=[`id`]", "arg=[$(id)]"]


def test_inspect_labels_carry_the_image_labels(sid_apptainer):
    c, nasty, plain = sid_apptainer
    ref_labels = json.loads(_app(c, f"inspect --json --labels {REF}"))["data"]["attributes"]["labels"]
    ours = json.loads(_app(c, f"inspect --json --labels {_link(plain)}"))["data"]["attributes"]["labels"]
    for k, v in PLAIN_CONFIG.labels.items():
        assert ours.get(k) == v == ref_labels.get(k)
    # The platform as apptainer's build labels it (1.4 writes build-arch; 1.5's successor also
    # org.opencontainers.image.architecture, which must then agree with ours).
    plain_ours = ours
    assert plain_ours["org.label-schema.build-arch"] == ref_labels["org.label-schema.build-arch"] == host_arch()
    assert plain_ours["org.opencontainers.image.architecture"] == \
        ref_labels.get("org.opencontainers.image.architecture", host_arch())
    ours = json.loads(_app(c, f"inspect --json --labels {_link(nasty)}"))["data"]["attributes"]["labels"]
    assert {k: ours.get(k) for k in APPTAINER_CONFIG.labels} == APPTAINER_CONFIG.labels


def test_multiarch_alias_path_runs(sid_apptainer):
    c, nasty, _ = sid_apptainer
    machine = platform.machine()  # what CVMFS_ARCH / `uname -m` gives on a worker node
    path = f"/w/repo/.multiarch/{machine}/{nasty.host}/{nasty.name}:{nasty.tag}"
    assert _env_of(c, path) == _env_of(c, _link(nasty))
