"""Build kube-apiserver + kube-controller-manager v1.20.2 from Debian bookworm's source package.

No registry we can reach ships Kubernetes server binaries, but Debian's `kubernetes` source
package builds offline with Debian's Go 1.19 (see /work/shared/notes/k8s-local-apiserver.md).
The build takes ~6.5 min on 2 cores, so the two binaries are cached and every later `up` reuses
them. Only stdlib is used here so that the build can run before the virtualenv exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .paths import cache_root

K8S_VERSION = "v1.20.2"
K8S_COMMIT = "faecb196815e248d3ecfb03c680a4507229c2a56"
SOURCE_PKG = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
SOURCE_DIR = "kubernetes-1.20.5+really1.20.2"
BINARIES = ("kube-apiserver", "kube-controller-manager")
APT_PACKAGES = (
    "golang-go",
    "rsync",
    "etcd-server",
    "dpkg-dev",
    "golang-github-modern-go-reflect2-dev",
)
RUNTIME_APT_PACKAGES = ("etcd-server", "openssl", "util-linux")
REFLECT2_SRC = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/debian-src.sources")
DEB_SRC = """\
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# The GC re-reads discovery every 30 s (hard-coded); 2 s makes GC of late-added CRDs' dependents quick.
GC_SYNC_OLD = "garbageCollector.Sync(gcClientset.Discovery(), 30*time.Second"
GC_SYNC_NEW = "garbageCollector.Sync(gcClientset.Discovery(), 2*time.Second"


def bin_dir() -> Path:
    """Where the cached binaries live: `<cache>/k8s-v1.20.2/bin`."""
    return cache_root() / f"k8s-{K8S_VERSION}" / "bin"


def binaries_present() -> bool:
    """True when both server binaries are cached and executable."""
    return all(os.access(bin_dir() / name, os.X_OK) for name in BINARIES)


def _log(msg: str) -> None:
    print(f"[kubelora-local build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _missing_packages(packages: tuple[str, ...]) -> list[str]:
    missing = []
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False)
        if "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def ensure_runtime_packages() -> None:
    """Install etcd/openssl/unshare if absent: `up` needs them even when the binaries are cached."""
    missing = _missing_packages(RUNTIME_APT_PACKAGES)
    if missing:
        _run(["apt-get", "update"], env=_apt_env())
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=_apt_env())


def _ensure_build_packages() -> None:
    """deb-src entries, Go, and Debian's reflect2 1.0.2 (the vendored 1.0.1 segfaults with Go 1.19)."""
    need_update = False
    if not DEB_SRC_FILE.exists():
        DEB_SRC_FILE.write_text(DEB_SRC)
        need_update = True
    missing = _missing_packages(APT_PACKAGES)
    if need_update or missing:
        _run(["apt-get", "update"], env=_apt_env())
    if missing:
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=_apt_env())


def _prepare_tree(work: Path) -> Path:
    """Fetch the source, swap reflect2, patch the GC resync period, write version.env."""
    _run(["apt-get", "source", "-q", SOURCE_PKG], cwd=work)
    tree = work / SOURCE_DIR
    vendored = tree / "vendor/github.com/modern-go/reflect2"
    shutil.rmtree(vendored)
    shutil.copytree(REFLECT2_SRC, vendored)
    core = tree / "cmd/kube-controller-manager/app/core.go"
    text = core.read_text()
    if GC_SYNC_OLD not in text:
        raise RuntimeError(f"GC patch target not found in {core}")
    core.write_text(text.replace(GC_SYNC_OLD, GC_SYNC_NEW))
    (work / "version.env").write_text(
        f"KUBE_GIT_VERSION={K8S_VERSION}\nKUBE_GIT_MAJOR=1\nKUBE_GIT_MINOR=20\n"
        f"KUBE_GIT_TREE_STATE=clean\nKUBE_GIT_COMMIT={K8S_COMMIT}\n"
    )
    return tree


def build(force: bool = False, keep_tree: bool = False) -> Path:
    """Build (or reuse) the binaries; returns the cache bin dir. Idempotent and safe to rerun."""
    out = bin_dir()
    if binaries_present() and not force:
        _log(f"cached binaries in {out}")
        return out
    if os.geteuid() != 0:
        raise RuntimeError("building needs root (apt-get); run `kubelora-local build` as root once")
    started = time.monotonic()
    _ensure_build_packages()
    work = Path(tempfile.mkdtemp(prefix="k8s-build-", dir=str(cache_root())))
    try:
        tree = _prepare_tree(work)
        env = {k: v for k, v in os.environ.items() if k not in {"GOFLAGS", "GOPATH", "GOCACHE", "GO111MODULE"}}
        _run(
            [
                "make",
                "WHAT=cmd/kube-apiserver cmd/kube-controller-manager",
                f"KUBE_GIT_VERSION_FILE={work / 'version.env'}",
            ],
            cwd=tree,
            env=env,
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in BINARIES:
            tmp = out / f".{name}.tmp"
            shutil.copy2(tree / "_output/bin" / name, tmp)
            tmp.chmod(0o755)
            tmp.rename(out / name)  # atomic: a half-copied binary never looks cached
    finally:
        if not keep_tree:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"built in {time.monotonic() - started:.0f} s -> {out}")
    return out


if __name__ == "__main__":
    build(force="--force" in sys.argv)
