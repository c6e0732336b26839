"""Adapter names, digests, URIs and manifest paths never make the agent write outside its cache (issue 14).

Hypothesis generates hostile inputs (``..``, ``/``, NUL, backslashes, unicode, very long strings) and each
property is checked on the file system itself: after a fetch, nothing exists in the sandbox that was not
there before except under the cache root, and every path the agent hands the engine is a direct child of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kubelora.api.digest import digest_of
from kubelora.api.runtime import MANIFEST_FILE, DesiredAdapter, DesiredAdapters
from kubelora_server.agent.fetch import (
    FetchError,
    cache_path,
    collect_garbage,
    fetch_adapter,
    fetch_and_check,
)
from kubelora_server.agent.state import Problem, Ready, Want
from kubelora_server.testing import write_manifest

BASE = "pvc://models/tiny"
HOSTILE_PARTS = ["..", ".", "/", "//", "\x00", "\\", "~", "a", "é", "\u202e", "\U0001f600", "-", "_", "x" * 300,
                 "%2e%2e", "%2f", "\n", " "]
HEX = "0123456789abcdef"

hostile_text = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PARTS), min_size=1, max_size=8).map("".join),
    st.text(min_size=0, max_size=80),
    st.text(alphabet="abc.-_/\x00", min_size=1, max_size=300),
)
digests = st.one_of(
    st.text(alphabet=HEX, min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    hostile_text,
    hostile_text.map(lambda t: "sha256:" + t),
)
uris = st.one_of(
    hostile_text,
    st.tuples(st.sampled_from(["file://", "pvc://", "s3://", "https://", "hf://"]), hostile_text).map("".join),
)
valid_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?\Z")


@dataclass
class Sandbox:
    root: Path
    cache: Path
    adapter: Path

    def outside_cache(self) -> set[Path]:
        """Everything in the sandbox that is not under the cache root."""
        found: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            for entry in dirnames + filenames:
                path = Path(dirpath) / entry
                if not path.is_relative_to(self.cache):
                    found.add(path)
        return found


def make_sandbox() -> Iterator[Sandbox]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = root / "src" / "a"
        adapter.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "/mnt/pvc/models/tiny",
                  "target_modules": ["q_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        (adapter / "adapter_model.safetensors").write_bytes(b"weights")
        write_manifest(adapter, BASE)
        (root / "deep").mkdir()
        yield Sandbox(root, root / "deep" / "cache", adapter)


def desired() -> DesiredAdapters:
    return DesiredAdapters(base_model=BASE, served_name="tiny", max_lora_rank=16, max_loras=1, max_cpu_loras=4)


def assert_stays_in_cache(box: Sandbox, outcome: Ready | Problem, before: set[Path]) -> None:
    assert box.outside_cache() == before
    if isinstance(outcome, Ready):
        assert Path(outcome.path).resolve().parent == box.cache.resolve()
    for entry in box.cache.iterdir() if box.cache.exists() else []:
        assert entry.resolve().parent == box.cache.resolve()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=hostile_text, digest=digests)
def test_desired_adapter_model_refuses_names_and_digests_that_are_not_one_path_component(name: str,
                                                                                          digest: str) -> None:
    try:
        item = DesiredAdapter(name=name, uri="file:///x", digest=digest)
    except ValidationError as exc:
        assert {str(e["loc"][0]) for e in exc.errors()} <= {"name", "digest"}
        return
    assert "/" not in item.name and "\x00" not in item.name and item.name not in (".", "..")
    for box in make_sandbox():
        assert cache_path(box.cache, item.name, str(item.digest)).resolve().parent == box.cache.resolve()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(hostile_text, valid_names), pin=st.one_of(st.none(), digests), uri=uris)
def test_hostile_name_pin_or_uri_never_writes_outside_the_cache(name: str, pin: str | None, uri: str) -> None:
    for box in make_sandbox():
        before = box.outside_cache()
        outcome = fetch_and_check(Want(name, uri, pin), desired(), box.cache)
        assert_stays_in_cache(box, outcome, before)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(hostile_text, valid_names), pin=st.one_of(st.none(), digests))
def test_a_real_adapter_under_any_name_lands_in_the_cache_or_is_refused(name: str, pin: str | None) -> None:
    for box in make_sandbox():
        before = box.outside_cache()
        outcome = fetch_and_check(Want(name, f"file://{box.adapter}", pin), desired(), box.cache)
        assert_stays_in_cache(box, outcome, before)


# Few parts, so that walks such as ../../evil (the planted copy) are drawn often, not once in a thousand.
path_like_names = st.lists(st.sampled_from(["..", ".", "deep", "evil"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(path_like_names, hostile_text), pinned=st.booleans())
@example(name="../../evil", pinned=True)
def test_a_verified_adapter_planted_outside_the_cache_is_never_served(name: str, pinned: bool) -> None:
    """The read side: a name that walks out of the cache must not find a cache entry there, even one that
    verifies (the pinned path reads the cache before the source)."""
    for box in make_sandbox():
        digest = json.loads((box.adapter / MANIFEST_FILE).read_text())["digest"]
        entry = f"evil-{digest.removeprefix('sha256:')[:12]}"
        for where in (box.root, box.root / "deep", box.cache.parent / "cache" / "deep"):
            where.mkdir(parents=True, exist_ok=True)
            shutil.copytree(box.adapter, where / entry)
        before = box.outside_cache()
        outcome = fetch_and_check(Want(name, f"file://{box.adapter}", digest if pinned else None), desired(),
                                  box.cache)
        if isinstance(outcome, Ready):
            assert Path(outcome.path).resolve().parent == box.cache.resolve()
        assert box.outside_cache() == before


@dataclass(frozen=True)
class DictSource:
    """An adapter source whose manifest lists whatever paths the test generated, hashed correctly, so only
    the path checks stand between it and the file system."""

    files: dict[str, bytes]

    def manifest(self) -> bytes:
        hashes = {rel: hashlib.sha256(data).hexdigest() for rel, data in self.files.items()}
        return json.dumps({
            "digest": digest_of(hashes), "files": hashes, "sizeBytes": 1, "baseModel": BASE, "rank": 8,
            "loraAlpha": 16.0, "targetModules": ["q_proj"], "method": "lora", "createdAt": "2026-12-04T00:00:00Z",
        }).encode()

    def read_bytes(self, rel: str) -> bytes:
        return self.manifest() if rel == MANIFEST_FILE else self.files[rel]

    def download(self, rel: str, dest: Path) -> None:
        dest.write_bytes(self.files[rel])


CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                     "base_model_name_or_path": "/mnt/pvc/models/tiny"}).encode()
hostile_rels = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PARTS), min_size=1, max_size=6).map("".join),
    st.lists(st.sampled_from(["..", ".", "a", "b", "", "\x00", "é"]), min_size=1, max_size=6).map("/".join),
    st.sampled_from(["/etc/passwd", "../../outside", "a/../../x", "./../y", "..\\z", MANIFEST_FILE]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.dictionaries(hostile_rels, st.binary(max_size=8), min_size=1, max_size=4),
       name=st.one_of(valid_names, hostile_text))
def test_manifest_paths_never_write_outside_the_cache(extra: dict[str, bytes], name: str) -> None:
    source = DictSource({"adapter_config.json": CONFIG, "adapter_model.safetensors": b"w", **extra})
    for box in make_sandbox():
        before = box.outside_cache()
        outcome = fetch_and_check(Want(name, "s3://b/a"), desired(), box.cache, lambda _uri: source)
        assert_stays_in_cache(box, outcome, before)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\x00b", "A", "-a", "a" * 64, "é", ""])
def test_invalid_names_are_refused_before_any_read(tmp_path: Path, name: str) -> None:
    def no_source(uri: str) -> DictSource:
        raise AssertionError(f"opened {uri} for an invalid name")

    with pytest.raises(FetchError) as err:
        fetch_adapter(Want(name, "s3://b/a"), tmp_path / "cache", no_source)
    assert err.value.problem.permanent and "not a valid adapter name" in err.value.problem.message


def test_a_symlink_planted_in_the_cache_is_not_followed(tmp_path: Path) -> None:
    for box in make_sandbox():
        digest = json.loads((box.adapter / MANIFEST_FILE).read_text())["digest"]
        box.cache.mkdir(parents=True)
        outside = box.root / "outside"
        outside.mkdir()
        entry = box.cache / f"a-{digest.removeprefix('sha256:')[:12]}"
        entry.symlink_to(outside, target_is_directory=True)
        outcome = fetch_and_check(Want("a", f"file://{box.adapter}", digest), desired(), box.cache)
        assert isinstance(outcome, Problem) and "resolves outside the cache" in outcome.message
        assert list(outside.iterdir()) == []
        collect_garbage(box.cache, keep=set())
        assert outside.is_dir()
