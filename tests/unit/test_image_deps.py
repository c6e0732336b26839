"""The image dependency check (kubelora_local.image_deps): which sets it resolves, from which pins, and that a
conflict fails it. The resolution itself needs PyPI and runs as `make image-deps`; here uv is faked."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path

import pytest

from kubelora_local import image_deps
from kubelora_local.image_deps import ImageSet, build_args, check, extra_requirements, image_sets, parse_pins

PROJECT = {"project": {"name": "kubelora", "optional-dependencies": {
    "server": ["httpx>=0.27", "kubernetes==36.0.3"],
    "cpu-engine": ["kubelora[server]", "torch>=2.4", "peft==0.21.2", "httpx>=0.27"],
    "all": ["kubelora[cpu-engine, server]", "pytest>=8"],
}}}


@pytest.mark.parametrize(("extra", "want"), [
    pytest.param("server", ["httpx>=0.27", "kubernetes==36.0.3"], id="plain"),
    pytest.param("cpu-engine", ["httpx>=0.27", "kubernetes==36.0.3", "torch>=2.4", "peft==0.21.2"],
                 id="self-reference-expanded-once"),
    pytest.param("all", ["httpx>=0.27", "kubernetes==36.0.3", "torch>=2.4", "peft==0.21.2", "pytest>=8"],
                 id="nested-and-several"),
])
def test_extra_requirements_expand_self_references(extra: str, want: list[str]) -> None:
    assert extra_requirements(PROJECT, extra) == want


def test_sets_follow_the_dockerfiles_and_pyproject() -> None:
    server, trainer = build_args(image_deps.SERVER_DOCKERFILE), build_args(image_deps.TRAINER_DOCKERFILE)
    sets = {s.name: s for s in image_sets()}
    assert sets["server-vllm"].requirements == [f"vllm=={server['VLLM_VERSION']}"]
    assert sets["server-vllm"].python == server["VLLM_PYTHON"]
    assert sets["server-vllm"].expect == {"torch": server["VLLM_TORCH_VERSION"]}
    venv = sets["server-venv"]
    assert f"torch=={server['VLLM_TORCH_VERSION']}" in venv.requirements
    assert venv.prefer_from == "server-vllm"
    assert not any(r.startswith("kubelora") for r in venv.requirements)
    assert "kubernetes==36.0.3" in venv.requirements  # from kubelora[server] inside cpu-engine
    assert sets["trainer"].requirements[0] == f"torch=={trainer['TORCH_VERSION']}"
    assert trainer["PYTHON_IMAGE"].startswith(f"python:{sets['trainer'].python}.")


def test_parse_pins_normalises_names() -> None:
    text = "Foo_Bar==1.0\nfastapi[standard]==0.136.3\n# comment\nnvidia-cudnn-cu13==9.1 ; sys_platform == 'linux'\n"
    assert parse_pins(text) == {"foo-bar": "1.0", "fastapi": "0.136.3", "nvidia-cudnn-cu13": "9.1"}


def fake_uv(tmp_path: Path, body: str) -> str:
    path = tmp_path / "uv"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


SETS = [
    ImageSet("below", "3.12", ["vllm==1.0"], expect={"torch": "2.14.0"}),
    ImageSet("venv", "3.12", ["transformers==5.23.0", "torch==2.14.0"], prefer_from="below"),
]


def test_a_conflict_fails_naming_the_set_and_the_venv_waits_for_it(tmp_path: Path) -> None:
    uv = fake_uv(tmp_path, """
        echo "Because vllm==1.0 depends on transformers<5.23.0 and you require transformers==5.23.0, ..." >&2
        exit 1
    """)
    problems = check(uv, tmp_path, SETS)
    assert len(problems) == 2
    assert problems[0].startswith("below (python 3.12, x86_64-manylinux_2_28) does not resolve")
    assert "transformers<5.23.0" in problems[0]
    assert problems[1] == "venv: not resolved, below did not resolve"


def test_a_resolution_that_picks_another_torch_fails_and_shadowing_is_listed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The fake writes pins into --output-file; the venv's file must start as a copy of the set below it.
    uv = fake_uv(tmp_path, """
        out=""; req=""
        for a in "$@"; do [ "$prev" = "--output-file" ] && out="$a"; prev="$a"; done
        case "$out" in
          *below.txt) printf 'torch==2.13.0\\ntransformers==5.22.2\\nvllm==1.0\\n' > "$out" ;;
          *venv.txt) grep -q '^transformers==5.22.2$' "$out" || exit 3
                     printf 'torch==2.13.0\\ntransformers==5.23.0\\n' > "$out" ;;
        esac
    """)
    problems = check(uv, tmp_path, SETS)
    assert problems == ["below: resolves torch==2.13.0, the Dockerfile expects 2.14.0"]
    assert "shadows below in the venv: transformers 5.22.2 -> 5.23.0" in capsys.readouterr().out
