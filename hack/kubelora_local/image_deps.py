"""What ships is what is tested: resolve each image's Python dependency set from metadata, fail on a conflict.

    .venv/bin/python -m kubelora_local.image_deps [--uv PATH] [--out DIR]      (`make image-deps`, part of `make test`)

The images are never built here, so a pin that cannot be installed beside the others would only show at
``docker build`` (or, worse, as pip's non-fatal "incompatible" warning). This resolves, with ``uv pip compile``
for the image's Python and platform (package metadata only, nothing installed), the three sets that ship:

- ``server-vllm``: ``vllm==$VLLM_VERSION`` as vLLM's image holds it, on ``$VLLM_PYTHON``; the resolution must
  pick the ``$VLLM_TORCH_VERSION`` the Dockerfile checks at build time;
- ``server-venv``: KubeLoRA's venv in that image, ``kubelora[cpu-engine]`` with torch constrained to vLLM's
  (the Dockerfile's constraints file), preferring vLLM's versions as pip keeps a system copy that fits; the
  packages where it differs are the ones the venv shadows (vLLM's own process never sees them), listed;
- ``trainer``: ``torch==$TORCH_VERSION`` plus ``kubelora[trainer]`` on ``$PYTHON_IMAGE``'s Python.

Versions come from the Dockerfiles' ARGs and pyproject's extras at run time, so a pin changed in either place
is checked as it is. The platform is x86_64 manylinux_2_28 (vLLM's own wheel tag; both base images have a newer
glibc). Needs PyPI (CI has it); exit 1 names the set and prints uv's explanation of the conflict.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_DOCKERFILE = ROOT / "server_image" / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
PLATFORM = "x86_64-manylinux_2_28"
HEADLINE = ("vllm", "torch", "transformers", "peft", "trl", "bitsandbytes")
NOT_ON_PYPI = {
    "flashinfer-python": "vLLM 0.34.0 pins flashinfer-python==0.7.3, which PyPI does not have (0.7.2.post1 and "
                         "0.7.4 only); vLLM's image installs it from flashinfer's own index",
}
"""Requirements of vLLM's wheel that its image installs from elsewhere: left out of the resolution (a uv
override with a marker that is never true), each with the reason."""


@dataclass(frozen=True)
class ImageSet:
    """One Python environment of an image: what is asked for, on which Python, and what must come out."""

    name: str
    python: str
    requirements: list[str]
    expect: dict[str, str] = field(default_factory=dict)
    """name -> version the resolution must pick (what the Dockerfile checks when it is built)."""
    prefer_from: str | None = None
    """Another set whose versions are preferred (packages already installed below this one)."""


def build_args(dockerfile: Path) -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=value`` defaults."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.MULTILINE))


def extra_requirements(pyproject: dict[str, object], extra: str) -> list[str]:
    """pyproject's requirements of ``extra`` with ``kubelora[...]`` self-references expanded (comments dropped)."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    name: str = project["name"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    out: list[str] = []
    for req in extras[extra]:
        match = re.fullmatch(rf"{re.escape(name)}\[([\w,\s-]+)\]", req.strip())
        if match:
            for inner in match.group(1).split(","):
                out += [r for r in extra_requirements(pyproject, inner.strip()) if r not in out]
        elif req not in out:
            out.append(req)
    return out


def image_sets(server: Path = SERVER_DOCKERFILE, trainer: Path = TRAINER_DOCKERFILE,
               pyproject: Path = PYPROJECT) -> list[ImageSet]:
    """The sets the two images ship, from their Dockerfiles and pyproject as they are now."""
    project = tomllib.loads(pyproject.read_text())
    sargs, targs = build_args(server), build_args(trainer)
    vllm_torch = sargs["VLLM_TORCH_VERSION"]
    python_image = re.fullmatch(r"python:(\d+\.\d+)\.\d+-\S+", targs["PYTHON_IMAGE"])
    if python_image is None:
        raise ValueError(f"{trainer}: PYTHON_IMAGE {targs['PYTHON_IMAGE']!r} names no python:X.Y.Z-... tag")
    return [
        ImageSet("server-vllm", sargs["VLLM_PYTHON"], [f"vllm=={sargs['VLLM_VERSION']}"],
                 expect={"torch": vllm_torch}),
        ImageSet("server-venv", sargs["VLLM_PYTHON"], [*extra_requirements(project, "cpu-engine"),
                                                       f"torch=={vllm_torch}"],
                 expect={"torch": vllm_torch}, prefer_from="server-vllm"),
        ImageSet("trainer", python_image.group(1), [f"torch=={targs['TORCH_VERSION']}",
                                                    *extra_requirements(project, "trainer")],
                 expect={"torch": targs["TORCH_VERSION"]}),
    ]


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a compiled requirements file, names normalised (PEP 503)."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def compile_set(uv: str, image: ImageSet, workdir: Path, compiled: dict[str, Path]) -> tuple[Path | None, str]:
    """Run ``uv pip compile`` for one set; (output file, or None on a conflict; uv's messages)."""
    req = workdir / f"{image.name}.in"
    req.write_text("\n".join(image.requirements) + "\n")
    overrides = workdir / "not-on-pypi.txt"
    overrides.write_text("".join(f"{name} ; python_version < '0'\n" for name in NOT_ON_PYPI))
    out = workdir / f"{image.name}.txt"
    if image.prefer_from:
        # uv prefers the versions already in the output file: pip in a --system-site-packages venv keeps the
        # system's copy of anything it fits, so the venv holds vLLM's versions except where a pin forbids them.
        shutil.copyfile(compiled[image.prefer_from], out)
    cmd = [uv, "pip", "compile", str(req), "--override", str(overrides), "--python-version", image.python,
           "--python-platform", PLATFORM, "--no-header", "--no-annotate", "--quiet", "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None, proc.stderr.strip() or proc.stdout.strip()
    return out, proc.stderr.strip()


def check(uv: str, workdir: Path, sets: list[ImageSet] | None = None) -> list[str]:
    """Resolve every set; the problems found (empty: all resolve and pick what the Dockerfiles check)."""
    problems: list[str] = []
    compiled: dict[str, Path] = {}
    pins: dict[str, dict[str, str]] = {}
    for image in image_sets() if sets is None else sets:
        if image.prefer_from and image.prefer_from not in compiled:
            problems.append(f"{image.name}: not resolved, {image.prefer_from} did not resolve")
            continue
        out, messages = compile_set(uv, image, workdir, compiled)
        if out is None:
            problems.append(f"{image.name} (python {image.python}, {PLATFORM}) does not resolve:\n{messages}")
            continue
        compiled[image.name] = out
        pins[image.name] = parse_pins(out.read_text())
        for name, want in image.expect.items():
            got = pins[image.name].get(name)
            if got != want:
                problems.append(f"{image.name}: resolves {name}=={got}, the Dockerfile expects {want}")
        headline = ", ".join(f"{n}=={pins[image.name][n]}" for n in HEADLINE if n in pins[image.name])
        print(f"{image.name}: {len(pins[image.name])} packages (python {image.python}, {PLATFORM}): {headline}")
        if image.prefer_from:
            below = pins[image.prefer_from]
            shadowed = sorted(f"{n} {below[n]} -> {v}" for n, v in pins[image.name].items() if below.get(n, v) != v)
            print(f"  shadows {image.prefer_from} in the venv: {', '.join(shadowed) or 'nothing'}")
    for name, why in NOT_ON_PYPI.items():
        print(f"left out: {name}: {why}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uv", default=None, help="uv executable (default: next to this Python, else on PATH)")
    p.add_argument("--out", type=Path, default=None, help="keep the compiled requirement files here")
    a = p.parse_args(argv)
    uv = a.uv or shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not uv:
        print("uv not found: `make image-deps` installs it into the venv", file=sys.stderr)
        return 2
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        problems = check(uv, a.out)
    else:
        with tempfile.TemporaryDirectory(prefix="kubelora-image-deps-") as d:
            problems = check(uv, Path(d))
    for problem in problems:
        print(f"CONFLICT {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
