"""Which checkpoint a restarted trainer continues from.

A pod can die at any byte of a checkpoint write. transformers writes ``trainer_state.json`` after the
adapter, optimizer, scheduler and RNG state of a checkpoint, so a checkpoint is complete exactly when its
``trainer_state.json`` parses and says it is the state at that step. A restart resumes from the newest
complete one; incomplete ones are removed (they would otherwise be mistaken for the newest by the next
restart or by checkpoint rotation). If checkpoints exist but none is complete, the run starts over and
says so loudly: it never silently starts from zero.

Where: ``<output>/checkpoints/rev-<revision>/checkpoint-<step>/``, beside the published adapters
(``<output>/rev-<revision>/``), never inside one: an adapter folder holds only what peft loads, so it can be
copied, pushed to the Hub or served as it is, and no one downloads optimizer state with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kubelora_trainer.storage import Location, download_dir, locate, upload_dir

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
"""The folder under ``spec.output.uri`` that holds every revision's checkpoints."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model_fsdp_0")
"""A single-process or DDP checkpoint holds the adapter; an FSDP one each rank's shard (a DCP folder)."""
_OPTIMIZER = ("optimizer.pt", "optimizer.bin", "optimizer_0")


def checkpoints_rel(revision: int) -> str:
    """Path of a revision's checkpoint folder relative to the output URI."""
    return f"{CHECKPOINTS_DIR}/rev-{revision}"


def checkpoints_uri(output_uri: str, revision: int) -> str:
    """URI of ``checkpoints/rev-<revision>/`` under the output URI."""
    return f"{output_uri.rstrip('/')}/{checkpoints_rel(revision)}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoint_problem(path: Path, step: int) -> str | None:
    """Why ``path`` is not a usable checkpoint for ``step``, or None when it is complete."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (interrupted while saving)"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable {STATE_FILE}: {exc}"
    if state.get("global_step") != step:
        return f"{STATE_FILE} says step {state.get('global_step')}, folder says {step}"
    if not any((path / w).exists() for w in _WEIGHTS):
        return "no adapter weights"
    if not any((path / o).exists() for o in _OPTIMIZER):
        return "no optimizer state"
    if not (path / "scheduler.pt").is_file():
        return "no scheduler.pt"
    for file in sorted(path.iterdir()):
        if file.is_file() and (problem := _file_problem(file)) is not None:
            return f"{file.name} is corrupt ({problem})"
    return None


def _file_problem(file: Path) -> str | None:
    """A file present but damaged (a disk error, a copy cut short, a bit flip): resuming from it would crash
    every restart, or worse, continue from garbage. torch.save writes a zip whose entries carry CRC-32s;
    safetensors starts with a JSON header whose offsets say how long the file must be."""
    if file.suffix in (".pt", ".pth") or (file.suffix == ".bin" and zipfile.is_zipfile(file)):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            return str(exc)
        return f"CRC mismatch in {bad}" if bad else None
    if file.suffix == ".safetensors":
        try:
            with file.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            return f"unreadable header: {exc}"
        if file.stat().st_size != 8 + size + end:
            return f"{file.stat().st_size} bytes, its header promises {8 + size + end}"
    return None


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """``checkpoint-<step>`` folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step, reverse=True)


def find_resume_checkpoint(root: Path, remove_incomplete: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint under ``root`` (logging what is skipped and why)."""
    candidates = list_checkpoints(root)
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt.path, ckpt.step)
        if problem is None:
            log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
            return ckpt
        log.warning("checkpoint %s is incomplete (%s)%s", ckpt.path, problem,
                    "; removing it" if remove_incomplete else "")
        if remove_incomplete:
            shutil.rmtree(ckpt.path, ignore_errors=True)
    if candidates:
        log.warning("none of the %d checkpoint(s) in %s is complete: training starts over from step 0",
                    len(candidates), root)
    else:
        log.info("no checkpoint in %s: training starts at step 0", root)
    return None


class RemoteCheckpoints:
    """Mirror of a local checkpoint folder in object storage (s3 outputs).

    Training always reads and writes checkpoints on local disk; this class pulls the newest complete remote
    checkpoint before training and pushes each new one after it is saved, ``trainer_state.json`` last, so
    the completeness rule above holds remotely too.
    """

    def __init__(self, loc: Location, rel: str, local_root: Path) -> None:
        self.loc = loc
        self.rel = rel.strip("/")
        self.local_root = local_root

    def _remote_steps(self) -> list[int]:
        base = self.loc.child(self.rel)
        try:
            entries = self.loc.fs.ls(base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            m = _CHECKPOINT.match(posixpath.basename(entry.rstrip("/")))
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps, reverse=True)

    def pull_newest(self) -> Checkpoint | None:
        """Download the newest remote checkpoint whose trainer_state.json says it is complete."""
        for step in self._remote_steps():
            got = self.pull_step(step)
            if got is not None:
                return got
        return None

    def pull_step(self, step: int) -> Checkpoint | None:
        """Download ``checkpoint-<step>`` if its trainer_state.json says it is complete."""
        name = f"checkpoint-{step}"
        remote = locate(self.loc.display(f"{self.rel}/{name}"))
        state_path = remote.child(STATE_FILE)
        try:
            with remote.fs.open(state_path, "rb") as fh:
                state = json.loads(fh.read())
        except (OSError, ValueError):
            log.warning("remote checkpoint %s is incomplete; skipping it", remote.display())
            return None
        if state.get("global_step") != step:
            return None
        dest = self.local_root / name
        if dest.exists():
            shutil.rmtree(dest)
        log.info("downloading checkpoint %s", remote.display())
        download_dir(remote, dest)
        return Checkpoint(dest, step)

    def push(self, ckpt_dir: Path) -> None:
        """Upload one checkpoint (state file last), then drop remote checkpoints rotated away locally."""
        upload_dir(ckpt_dir, self.loc, f"{self.rel}/{ckpt_dir.name}", last=(STATE_FILE,))
        local = {c.step for c in list_checkpoints(self.local_root)}
        for step in self._remote_steps():
            if step not in local:
                with contextlib.suppress(FileNotFoundError):
                    self.loc.fs.rm(self.loc.child(f"{self.rel}/checkpoint-{step}"), recursive=True)
