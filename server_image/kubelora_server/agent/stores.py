"""Where adapter files are read from: one small reader per URI scheme.

Each reader answers three questions about one adapter folder: the bytes of a file (the manifest), a copy of a
file into the cache, and, for adapters that have no KubeLoRA manifest, which files the folder holds.
Listing is the scheme's own: a directory walk (pvc://, file://), an object listing (s3://), the repository's
file list at one commit (hf://), the layers of the artifact (oci://). Plain HTTP has no listing, so an https://
adapter without a manifest is, by peft's convention, ``adapter_config.json`` plus ``adapter_model.safetensors``
(or ``adapter_model.bin`` when there is no safetensors file). The OCI reader is in :mod:`.oci`.

A missing file raises :class:`FileNotFoundError`; a failure that may go away (network, server error)
:class:`SourceUnavailable`. Blocking code: the runner calls it in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NOT_ADAPTER_FILES = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                               "rng_state.pth"})
"""Training state some tools leave beside an adapter; never copied for a manifest-less adapter."""


class SourceUnavailable(OSError):
    """The source could not be read for a reason that may go away (network, server error)."""


class AdapterSource(Protocol):
    """Read access to the files of one adapter directory. Missing files raise FileNotFoundError."""

    def read_bytes(self, rel: str) -> bytes: ...

    def download(self, rel: str, dest: Path) -> None: ...

    def list_files(self) -> list[str]:
        """Relative paths of the files at the top of the adapter folder (FileNotFoundError: no such folder)."""
        ...


def adapter_files(names: list[str]) -> list[str]:
    """The files of a manifest-less adapter among a folder's top-level ``names``: no subfolders (checkpoints,
    merged models), no hidden files (``.gitattributes``), no training state."""
    return sorted(n for n in set(names)
                  if "/" not in n and not n.startswith(".") and n not in NOT_ADAPTER_FILES)


@dataclass(frozen=True)
class LocalSource:
    """pvc:// (mounted at /mnt/pvc/<claim>) and file:// adapters."""

    root: Path

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def download(self, rel: str, dest: Path) -> None:
        shutil.copyfile(self.root / rel, dest)

    def list_files(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(str(self.root))
        return [p.name for p in self.root.iterdir() if p.is_file() and not p.is_symlink()]


@dataclass(frozen=True)
class FsspecSource:
    """s3:// adapters through s3fs (credentials from the AWS_* environment the Secret provides)."""

    fs: Any
    root: str

    def read_bytes(self, rel: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(f"{self.root}/{rel}"))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise SourceUnavailable(f"reading {self.root}/{rel}: {exc}") from exc

    def download(self, rel: str, dest: Path) -> None:
        try:
            self.fs.get_file(f"{self.root}/{rel}", str(dest))
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise SourceUnavailable(f"downloading {self.root}/{rel}: {exc}") from exc

    def list_files(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise SourceUnavailable(f"listing {self.root}: {exc}") from exc
        prefix = self.root.rstrip("/") + "/"
        return [str(e["name"]).removeprefix(prefix) for e in entries if e.get("type") == "file"]


@dataclass(frozen=True)
class HttpsSource:
    """https:// adapters: no listing over HTTP, so each file is read at ``<uri>/<file>``."""

    base_url: str
    timeout: float = 60.0

    def _url(self, rel: str) -> str:
        return self.base_url.rstrip("/") + "/" + quote(rel)

    def read_bytes(self, rel: str) -> bytes:
        import httpx

        try:
            resp = httpx.get(self._url(rel), timeout=self.timeout, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"GET {self._url(rel)}: {exc}") from exc
        self._check(resp.status_code, rel)
        return resp.content

    def download(self, rel: str, dest: Path) -> None:
        import httpx

        try:
            with httpx.stream("GET", self._url(rel), timeout=self.timeout, follow_redirects=True) as resp:
                self._check(resp.status_code, rel)
                with dest.open("wb") as fh:
                    for chunk in resp.iter_bytes(1 << 20):
                        fh.write(chunk)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"GET {self._url(rel)}: {exc}") from exc

    def _exists(self, rel: str) -> bool:
        import httpx

        try:
            with httpx.stream("GET", self._url(rel), timeout=self.timeout, follow_redirects=True) as resp:
                self._check(resp.status_code, rel)  # the body is not read: a GET, because not every server does HEAD
        except FileNotFoundError:
            return False
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"GET {self._url(rel)}: {exc}") from exc
        return True

    def list_files(self) -> list[str]:
        if not self._exists(CONFIG_FILE):
            raise FileNotFoundError(self._url(CONFIG_FILE))
        for weights in WEIGHT_FILES:
            if self._exists(weights):
                return [CONFIG_FILE, weights]
        return [CONFIG_FILE]

    def _check(self, status: int, rel: str) -> None:
        if status in (404, 410):
            raise FileNotFoundError(self._url(rel))
        if status >= 400:
            raise SourceUnavailable(f"GET {self._url(rel)}: HTTP {status}")


@dataclass
class HubSource:
    """hf://org/name[@revision] adapters through huggingface_hub (``HF_ENDPOINT``, ``HF_TOKEN`` from the env).

    The revision (default ``main``) is resolved to a commit once, and every file is read at that commit: a
    branch that moves during the download cannot mix two versions.
    """

    repo: str
    revision: str | None = None
    _commit: str | None = field(default=None, init=False, repr=False)
    _files: list[str] = field(default_factory=list, init=False, repr=False)

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)

    def _resolve(self) -> str:
        if self._commit is None:
            from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

            try:
                info = self._api().model_info(self.repo, revision=self.revision or "main")
            except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
                raise FileNotFoundError(f"hf://{self.repo}@{self.revision or 'main'}: {exc}") from None
            except Exception as exc:
                raise SourceUnavailable(f"hf://{self.repo}: {exc}") from exc
            self._commit = str(info.sha)
            self._files = [s.rfilename for s in (info.siblings or [])]
        return self._commit

    def list_files(self) -> list[str]:
        self._resolve()
        return list(self._files)

    def download(self, rel: str, dest: Path) -> None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError

        commit = self._resolve()
        if rel not in self._files:  # no request for what the commit does not hold (the manifest, usually)
            raise FileNotFoundError(f"hf://{self.repo}@{commit}/{rel}")
        # A private scratch folder: hf_hub_download keeps metadata under local_dir/.cache, which must not land
        # in the adapter's copy.
        with tempfile.TemporaryDirectory(prefix=".hf-", dir=dest.parent) as scratch:
            try:
                got = hf_hub_download(self.repo, rel, revision=commit, local_dir=scratch,
                                      endpoint=os.environ.get("HF_ENDPOINT") or None,
                                      token=os.environ.get("HF_TOKEN") or None)
            except (EntryNotFoundError, RemoteEntryNotFoundError):
                raise FileNotFoundError(f"hf://{self.repo}@{commit}/{rel}") from None
            except Exception as exc:
                raise SourceUnavailable(f"hf://{self.repo}@{commit}/{rel}: {exc}") from exc
            os.replace(got, dest)

    def read_bytes(self, rel: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix=".hf-read-") as scratch:
            target = Path(scratch) / "file"
            self.download(rel, target)
            return target.read_bytes()
