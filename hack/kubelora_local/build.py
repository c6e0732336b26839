"""Build the local cluster's Go programs from Go modules and cache them by version.

Each program has a small Go module under `hack/` that pins the upstream release (k8s.io/kubernetes
v1.37.2 with its staging modules re-pointed at v0.37.2, etcd v3.7.3, CoreDNS, cli-utils' kstatus,
Kueue). `go build -trimpath` builds it once into `<cache>/bin/<program>-<version>-<digest>/`; the
digest covers the module's go.mod, go.sum and sources, so editing a module rebuilds only that
program. Go's own module and build caches make a rebuild after a cache wipe quick. Only stdlib is
used here so that the build can run before the virtualenv exists.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_root, repo_root

K8S_VERSION = "v1.37.2"
RUNTIME_APT_PACKAGES = ("openssl", "util-linux")
_K8S_VERSION_PKG = "k8s.io/component-base/version"


@dataclass(frozen=True)
class Program:
    """One binary: the Go module that builds it, the package path and the release it pins."""

    name: str
    module: str  # directory under hack/
    package: str
    version: str
    ldflags: tuple[str, ...] = ()

    @property
    def module_dir(self) -> Path:
        return repo_root() / "hack" / self.module

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.module_dir.iterdir()):
            if f.suffix == ".go" or f.name in {"go.mod", "go.sum"}:
                h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()[:12]

    def path(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}-{self.digest()}" / self.name


def _k8s(name: str) -> Program:
    v = K8S_VERSION
    # /version and `kubectl version` report what the binary is, not v0.0.0-master.
    flags = ("gitVersion=" + v, "gitMajor=1", "gitMinor=" + v.split(".")[1], "gitTreeState=clean")
    ldflags = tuple(f"{_K8S_VERSION_PKG}.{f}" for f in flags)
    return Program(name, "kubernetes", f"k8s.io/kubernetes/cmd/{name}", v, ldflags)


PROGRAMS: dict[str, Program] = {
    p.name: p
    for p in (
        _k8s("kube-apiserver"),
        _k8s("kube-controller-manager"),
        _k8s("kube-scheduler"),
        Program("etcd", "etcd", ".", "v3.7.3"),
        Program("coredns", "coredns", ".", "v1.15.0"),
        Program("kstatus", "kstatus", ".", "v0.37.2"),
        Program("kueue", "kueue", "sigs.k8s.io/kueue/cmd/kueue", "v0.17.0"),
    )
}
# What `up` needs; kstatus and Kueue are built on demand by the tests that use them.
CLUSTER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "coredns")


def binary(name: str) -> Path:
    """The cached binary of `name` (it may not exist yet: see `build`)."""
    return PROGRAMS[name].path()


def binaries_present(names: tuple[str, ...] = CLUSTER) -> bool:
    """True when every binary in `names` is cached and executable."""
    return all(os.access(binary(n), os.X_OK) for n in names)


def _log(msg: str) -> None:
    print(f"[kubelora-local build] {msg}", file=sys.stderr, flush=True)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise RuntimeError("building the local cluster needs Go 1.26 (`go` on PATH); see the README")
    return go


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
    """Install openssl/unshare if absent: `up` needs them even when the binaries are cached."""
    missing = _missing_packages(RUNTIME_APT_PACKAGES)
    if missing:
        subprocess.run(["apt-get", "update"], env=_apt_env(), check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=_apt_env(), check=True)


def _build_group(programs: list[Program]) -> None:
    """One `go build` per module: the programs of a module share its compiled packages."""
    module = programs[0].module_dir
    with tempfile.TemporaryDirectory(prefix="kubelora-build-", dir=str(cache_root())) as tmp:
        ldflags = " ".join(["-s", "-w", *(f"-X {f}" for f in programs[0].ldflags)])
        pkgs = [p.package for p in programs]
        # -o DIR with several packages writes one binary each; with one package "." it writes DIR/<module name>.
        out = tmp + "/" if len(pkgs) > 1 else f"{tmp}/{programs[0].name}"
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        cmd = [_go(), "build", "-trimpath", f"-ldflags={ldflags}", "-o", out, *pkgs]
        _log(f"{module.name}: go build {' '.join(pkgs)}")
        subprocess.run(cmd, cwd=module, env=env, check=True)
        for p in programs:
            dest = p.path()
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.with_name(f".{p.name}.tmp")
            shutil.copy2(Path(tmp) / p.name, tmp_dest)
            tmp_dest.chmod(0o755)
            tmp_dest.rename(dest)  # atomic: a half-copied binary never looks cached
            for old in dest.parent.parent.glob(f"{p.name}-v*"):
                if old != dest.parent:  # an earlier version or module digest of this program
                    shutil.rmtree(old, ignore_errors=True)


def build(names: tuple[str, ...] = CLUSTER, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the binaries in `names`; returns name -> path. Idempotent and safe to rerun."""
    todo = [PROGRAMS[n] for n in names if force or not os.access(binary(n), os.X_OK)]
    groups: dict[str, list[Program]] = {}
    for p in todo:
        groups.setdefault(p.module, []).append(p)
    total = time.monotonic()
    for i, group in enumerate(groups.values(), 1):
        started = time.monotonic()
        _log(f"[{i}/{len(groups)}] building {', '.join(p.name for p in group)} {group[0].version}")
        _build_group(group)
        _log(f"[{i}/{len(groups)}] done in {time.monotonic() - started:.0f} s")
    if todo:
        _log(f"built {len(todo)} binaries in {time.monotonic() - total:.0f} s -> {cache_root() / 'bin'}")
    else:
        _log(f"cached: {', '.join(names)} in {cache_root() / 'bin'}")
    return {n: binary(n) for n in names}


if __name__ == "__main__":
    build(force="--force" in sys.argv)
