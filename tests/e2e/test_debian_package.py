"""The Debian package (debian/): built by dpkg-buildpackage from this checkout's files, checked by
lintian, then installed with apt-get into a scratch root and run from there.

The scratch root is an overlay over / in a private mount namespace, chrooted: the upper layer is a
tmpfs that goes with the namespace, so the host's root is never written. Its /run is empty, so the
maintainer scripts see no running systemd and leave the host's alone. The package's dependencies
(Debian's python3-trio, -h11, -dnspython, -h2) are installed on the host by scripts/setup: apt-get
finds them there and downloads nothing.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from relay import __version__
from tests.root import require_root

ROOT = Path(__file__).parent.parent.parent
# The system's python3 and tools: not a virtualenv's or pyenv's python first on PATH.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "cython3", "lintian", "unshare", "chroot")


def system_run(args, timeout, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"}, **kwargs
    )


def test_the_changelog_has_the_project_version():
    """debian/changelog's top entry names the package version: it must be relay.__version__."""
    top = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert re.fullmatch(r"relay \((\S+)\) \S+; urgency=\w+", top)[1] == __version__


def checkout_files() -> list[str]:
    """The files a commit of this checkout would hold: tracked ones and new ones not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    return sorted({name.decode() for name in listed if name and (ROOT / name.decode()).is_file()})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """dpkg-buildpackage -us -uc -b in a copy of the checkout (it writes the .deb beside the tree)."""
    require_root("installs a package into a scratch root (mount namespace, chroot)")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=SYSTEM_PATH) is None]
    assert not missing, f"scripts/setup installs the packaging tools; missing: {missing}"
    tree = tmp_path_factory.mktemp("deb") / f"relay-{__version__}"
    for name in checkout_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    build = system_run(["dpkg-buildpackage", "-us", "-uc", "-b"], timeout=600, cwd=tree)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    arch = system_run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()
    deb = tree.parent / f"relay_{__version__}_{arch}.deb"
    assert deb.is_file(), sorted(path.name for path in tree.parent.iterdir())
    return deb


def test_lintian_finds_no_errors(built):
    changes = next(built.parent.glob("relay_*.changes"))
    lint = system_run(["lintian", "--fail-on", "error", str(changes)], timeout=300)
    tags = [line for line in lint.stdout.splitlines() if re.match(r"[EWIXPO]: ", line)]
    assert lint.returncode == 0 and not [tag for tag in tags if tag.startswith("E: ")], lint.stdout + lint.stderr


def test_the_package_holds_the_compiled_fast_path_and_the_unit(built):
    listing = system_run(["dpkg-deb", "--contents", str(built)], timeout=60).stdout
    assert re.search(r"\./usr/lib/python3/dist-packages/relay/_fastpath\.cpython-\S+\.so\n", listing), listing
    assert "./usr/bin/relay\n" in listing and "./etc/relay/relay.toml\n" in listing
    fields = system_run(["dpkg-deb", "--field", str(built), "Version", "Depends"], timeout=60).stdout
    assert f"Version: {__version__}\n" in fields
    # pyproject.toml's pins, as Debian dependencies (debian/py3dist-overrides): python3-trio (>= 0.22)
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in (re.fullmatch(r"([\w-]+)>=([\d.]+)", pin).groups() for pin in pins):
        assert f"python3-{name} (>= {version})" in fields
    assert "adduser" in fields


# Each step prints "@@ name" first; `set -e` stops at the first that fails. $1: the .deb, $2: the
# scratch directory (a tmpfs is mounted on it here, in the namespace only).
SCRATCH_ROOT = r"""
set -euo pipefail
deb=$1 top=$2
mount -t tmpfs -o size=1g,mode=0755 relay-scratch "$top"
mkdir "$top/upper" "$top/work" "$top/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$top/upper,workdir=$top/work" "$top/root"
mount --rbind /dev "$top/root/dev"
mount -t proc proc "$top/root/proc"
mount -t tmpfs tmpfs "$top/root/run"
mount -t tmpfs tmpfs "$top/root/tmp"
cp "$deb" "$top/root/tmp/"
exec chroot "$top/root" /bin/bash -euo pipefail -c '
export PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
if getent passwd relay >/dev/null; then userdel relay; fi  # the host has one: make it the package'"'"'s
echo "@@ install"; apt-get install -y --no-install-recommends /tmp/relay_*.deb 2>&1
echo "@@ version"; /usr/bin/relay --version
echo "@@ check-help"; /usr/bin/relay check --help
echo "@@ module"; python3 -c "import relay, relay.fastpath as f; print(relay.__file__, f.NAME, f.WHY)"
echo "@@ user"; getent passwd relay
echo "@@ conffiles"; dpkg-query --show --showformat="\${Conffiles}\n" relay
echo "@@ unit"; grep ^Exec /lib/systemd/system/relay.service
echo "@@ enabled"; systemctl is-enabled relay.service || true
echo "@@ purge"; apt-get purge -y relay 2>&1
echo "@@ after-purge"; getent passwd relay || echo "no relay user"; getent group relay || echo "no relay group"
ls /etc/relay 2>&1 || true
'
"""


def host_state() -> tuple:
    user = subprocess.run(["getent", "passwd", "relay"], capture_output=True, text=True, timeout=30).stdout
    package = subprocess.run(["dpkg-query", "--show", "relay"], capture_output=True, text=True, timeout=30)
    return user, package.returncode, package.stdout, Path("/etc/relay/relay.toml").exists()


def test_installed_into_a_scratch_root_it_runs_and_purges_cleanly(built, tmp_path):
    before = host_state()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = system_run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", SCRATCH_ROOT, "-", built, scratch], timeout=600
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    steps = dict(re.findall(r"^@@ (\S+)\n(.*?)(?=^@@ |\Z)", run.stdout, re.M | re.S))

    assert f"Setting up relay ({__version__})" in steps["install"]
    assert steps["version"].strip() == f"relay {__version__} (fast path: cython extension)"
    assert steps["check-help"].startswith("usage: relay check") and "--check-target" in steps["check-help"]
    # Debian's python3 runs the package's own module and compiled extension, not this checkout's.
    module, name, _ = steps["module"].split(maxsplit=2)
    assert module == "/usr/lib/python3/dist-packages/relay/__init__.py" and name == "cython"
    # A system user (below 1000) with no login shell, made by postinst.
    _, _, uid, _, _, home, shell = steps["user"].strip().split(":")
    assert int(uid) < 1000 and home == "/var/lib/relay" and shell == "/usr/sbin/nologin"
    assert steps["conffiles"].split()[0] == "/etc/relay/relay.toml"
    assert "ExecStart=/usr/bin/relay --config /etc/relay/relay.toml" in steps["unit"]
    assert "/usr/local" not in steps["unit"]
    assert steps["enabled"].strip() == "disabled"  # enabled by the admin once relay.toml is edited
    assert (
        "no relay user\nno relay group\n" in steps["after-purge"]
        and "No such file or directory" in steps["after-purge"]
    )

    assert host_state() == before
