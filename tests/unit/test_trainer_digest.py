"""The shared adapter digest, manifest verification and the completeness rule for checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from kubelora.api.digest import (
    DigestMismatchError,
    adapter_files,
    check_files,
    digest_of,
    file_sha256,
    hash_tree,
)
from kubelora.api.runtime import MANIFEST_FILE, TrainerRunConfig
from kubelora_trainer.checkpoints import checkpoint_problem, find_resume_checkpoint, list_checkpoints
from kubelora_trainer.publish import ManifestError, _publish_local, build_manifest, verify_adapter_dir


def make_adapter_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]})
    )
    (root / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "extra.txt").write_text("x")
    return root


def run_config(tmp_path: Path) -> TrainerRunConfig:
    return TrainerRunConfig.model_validate(
        {
            "name": "bot",
            "namespace": "team",
            "revision": 3,
            "spec": {
                "baseModel": {"uri": "pvc://models/llama"},
                "dataset": {"uri": "pvc://data/t.jsonl"},
                "output": {"uri": f"file://{tmp_path}/out"},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16},
            },
        }
    )


def test_digest_is_sha256sum_listing() -> None:
    files = {"b.txt": "22" * 32, "a.txt": "11" * 32}
    listing = f"{'11' * 32}  a.txt\n{'22' * 32}  b.txt\n"
    assert digest_of(files) == "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    assert digest_of(dict(reversed(list(files.items())))) == digest_of(files)


def test_digest_matches_coreutils(tmp_path: Path) -> None:
    if not shutil.which("sha256sum"):
        pytest.skip("no sha256sum")
    root = make_adapter_dir(tmp_path / "a")
    (root / MANIFEST_FILE).write_text("{}")
    (root / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (root / "checkpoints" / "checkpoint-1" / "x").write_text("ignored")
    cmd = (
        "find . -type f ! -name kubelora-manifest.json ! -path './checkpoints/*' -printf '%P\\n' "
        "| LC_ALL=C sort | xargs sha256sum | sha256sum"
    )
    out = subprocess.run(["sh", "-c", cmd], cwd=root, capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest_of(hash_tree(root)) == f"sha256:{out}"


def test_tree_excludes_manifest_and_checkpoints(tmp_path: Path) -> None:
    root = make_adapter_dir(tmp_path / "a")
    (root / MANIFEST_FILE).write_text("{}")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "state").write_text("x")
    assert adapter_files(root) == ["adapter_config.json", "adapter_model.safetensors", "sub/extra.txt"]
    assert hash_tree(root)["sub/extra.txt"] == hashlib.sha256(b"x").hexdigest()
    assert file_sha256(root / "sub" / "extra.txt") == hashlib.sha256(b"x").hexdigest()


def test_check_files_names_every_difference(tmp_path: Path) -> None:
    root = make_adapter_dir(tmp_path / "a")
    files = hash_tree(root)
    digest = digest_of(files)
    assert check_files(root, files, digest) == files
    (root / "adapter_model.safetensors").write_bytes(b"tampered")
    (root / "sub" / "extra.txt").unlink()
    (root / "adapter_model.bin").write_bytes(b"sneaky")
    with pytest.raises(DigestMismatchError) as exc:
        check_files(root, files, digest)
    msg = str(exc.value)
    assert "adapter_model.safetensors: sha256" in msg
    assert "sub/extra.txt: listed in the manifest but missing" in msg
    assert "adapter_model.bin: present but not listed" in msg
    with pytest.raises(DigestMismatchError, match="does not match its own file list"):
        check_files(make_adapter_dir(tmp_path / "b"), hash_tree(tmp_path / "b"), "sha256:" + "0" * 64)


def test_publish_local_writes_manifest_last_and_verifies(tmp_path: Path) -> None:
    run = run_config(tmp_path)
    rev = tmp_path / "out" / "rev-3"
    (rev / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (rev / "stale.bin").write_text("from a crashed attempt")
    (rev / MANIFEST_FILE).write_text("{}")
    staging = make_adapter_dir(rev / ".staging-x")
    manifest = build_manifest(staging, run, {"train_loss": 1.5})
    assert manifest.rank == 8 and manifest.lora_alpha == 16 and manifest.target_modules == ["q_proj", "v_proj"]
    assert manifest.base_model == "pvc://models/llama" and manifest.source == "team/bot@3"
    _publish_local(staging, rev, manifest)
    assert not (rev / "stale.bin").exists()
    assert (rev / "checkpoints" / "checkpoint-5").is_dir()
    got = verify_adapter_dir(rev)
    assert got == manifest
    assert json.loads((rev / MANIFEST_FILE).read_text())["sizeBytes"] == manifest.size_bytes
    (rev / "adapter_model.safetensors").write_bytes(b"\x00weights" * 99 + b"\x01weights")
    with pytest.raises(DigestMismatchError, match=r"adapter_model\.safetensors"):
        verify_adapter_dir(rev)


def test_verify_without_manifest(tmp_path: Path) -> None:
    root = make_adapter_dir(tmp_path / "a")
    with pytest.raises(ManifestError, match="incomplete"):
        verify_adapter_dir(root)
    (root / MANIFEST_FILE).write_text("not json")
    with pytest.raises(ManifestError, match="not a valid manifest"):
        verify_adapter_dir(root)


def _valid_file(path: Path) -> None:
    """What torch.save (a zip with CRC-32s) or safetensors (a JSON header, then the data) would write."""
    if path.suffix == ".safetensors":
        header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    elif path.suffix in (".pt", ".pth"):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"state" * 100)
    else:
        path.write_bytes(b"x")


def _checkpoint(
    root: Path,
    step: int,
    state_step: int | None = None,
    files: tuple[str, ...] = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"),
) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for f in files:
        _valid_file(d / f)
    if state_step is not None:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
    return d


def test_resume_picks_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5, 5)
    _checkpoint(root, 10, 10)
    torn = _checkpoint(root, 15, None)  # killed before trainer_state.json was written
    bad = _checkpoint(root, 20, 20, files=("adapter_model.safetensors",))
    (root / "checkpoint-x").mkdir()
    assert [c.step for c in list_checkpoints(root)] == [20, 15, 10, 5]
    assert checkpoint_problem(torn, 15) == "no trainer_state.json (interrupted while saving)"
    assert checkpoint_problem(bad, 20) == "no optimizer state"
    ckpt = find_resume_checkpoint(root)
    assert ckpt is not None and ckpt.step == 10
    assert not torn.exists() and not bad.exists()


def test_an_fsdp_checkpoint_of_shard_folders_is_complete(tmp_path: Path) -> None:
    """FSDP writes each rank's shard with torch.distributed.checkpoint: folders instead of files."""
    root = tmp_path / "checkpoints"
    d = _checkpoint(root, 8, 8, files=("scheduler.pt",))
    (d / "pytorch_model_fsdp_0").mkdir()
    assert checkpoint_problem(d, 8) == "no optimizer state"
    (d / "optimizer_0").mkdir()
    assert checkpoint_problem(d, 8) is None
    ckpt = find_resume_checkpoint(root)
    assert ckpt is not None and ckpt.step == 8


def test_resume_with_only_broken_checkpoints_starts_over_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    d = _checkpoint(root, 3, None)
    (d / "trainer_state.json").write_text('{"global_st')
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(root) is None
    assert "training starts over from step 0" in caplog.text
    assert find_resume_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize(("damage", "problem"), [
    pytest.param(lambda d: _flip_last_data_byte(d / "optimizer.pt"), "optimizer.pt is corrupt (CRC mismatch",
                 id="bit-flip-in-optimizer"),
    pytest.param(lambda d: _truncate(d / "scheduler.pt"), "scheduler.pt is corrupt", id="truncated-scheduler"),
    pytest.param(lambda d: _truncate(d / "adapter_model.safetensors", 2),
                 "adapter_model.safetensors is corrupt (", id="truncated-weights"),
])
def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, damage: Any, problem: str) -> None:
    """Complete by the save protocol (trainer_state.json written last), but a file was damaged afterwards:
    resuming from it would crash every restart, so the restart resumes from the one before."""
    root = tmp_path / "checkpoints"
    _checkpoint(root, 10, 10)
    newest = _checkpoint(root, 20, 20)
    assert checkpoint_problem(newest, 20) is None
    damage(newest)
    assert (checkpoint_problem(newest, 20) or "").startswith(problem)
    ckpt = find_resume_checkpoint(root)
    assert ckpt is not None and ckpt.step == 10
    assert not newest.exists()


def _flip_last_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"state") + 7] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - (keep or len(data) // 2)])
