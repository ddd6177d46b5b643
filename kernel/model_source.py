"""What ``--model`` may name, and the directory both backends load for it.

One spec, five forms, resolved the same way by every command and both backends:

- a named model (``smollm2-135m``, ``gemma3-270m``): its installed GGUF, converted;
- a ``.gguf`` file: converted once into the cache (:mod:`ifedicl.kernel.gguf_cache`);
- the id a run recorded for a GGUF model (``gguf:FILE@sha256:PREFIX``): its cached conversion;
- a hub id at a revision (``owner/name@REV``, what ``--revision REV`` makes of ``--model owner/name``): that
  revision's snapshot directory in the HF cache (downloaded if missing and the hub is reachable);
- an HF directory or a hub id (``owner/name``): unchanged.

What a run records as its model (:func:`recorded_identity`, the fingerprint's ``model_id``) is the model's
content wherever it can be known, so a run is refused for any other model and accepted for the same one
wherever it lies:

- a GGUF model: its file's content (:attr:`GgufSource.model_id`), whichever form named it;
- a local HF directory: ``dir@sha256:DIGEST`` of its files (:func:`directory_digest`), not its path, so a
  run federated from ``/data/m`` serves from ``/models/m``, and another model copied to ``/data/m`` is refused;
- a hub id at a revision: ``owner/name@COMMIT``, the commit the revision resolved to (``ifedicl serve`` and
  ``predict`` given the hub id alone load the commit the published runs record);
- a hub id without a revision: the id.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from pathlib import Path

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.gguf_cache import conversion_dir, converted_dir, is_gguf_path, source_of
from ifedicl.kernel.model_catalog import MODELS

_GGUF_ID = re.compile(r"^gguf:(?P<file>.+)@sha256:(?P<prefix>[0-9a-f]{16})$")
_HUB_AT_REVISION = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)@(?P<revision>[^\s@]+)$")
_REVISION = re.compile(r"^[^\s@]+$")

WHOLE_FILE_BYTES = 16 << 20  # files up to this size are hashed whole
SAMPLES = 16  # a larger file: this many evenly spaced blocks (first and last included) ...
SAMPLE_BYTES = 1 << 20  # ... of this size, plus its size and, for safetensors, its whole header
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on its JSON header


class UnknownModelError(IfediclError):
    """A ``--model`` that names nothing this machine can load."""


def with_revision(model: str, revision: str | None) -> str:
    """The spec ``--model MODEL --revision REV`` names (``owner/name@REV``), or a one-line error naming
    ``--revision`` when the model is not a hub id."""
    if revision is None:
        return model
    if not _REVISION.match(revision):
        raise UnknownModelError(f"--revision: {revision!r} is not a revision (a branch, tag or commit hash)")
    if not is_hub_id(model):
        raise UnknownModelError(
            f"--revision: applies to a hub model id (owner/name), not to {model!r} (a local or named model "
            "is loaded as it is)"
        )
    return f"{model}@{revision}"


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a hub model without a revision (``owner/name``), not a local or named model."""
    local = spec in MODELS or is_gguf_path(spec) or Path(spec).expanduser().exists() or _GGUF_ID.match(spec)
    return not local and "@" not in spec and _HUB_AT_REVISION.match(f"{spec}@main") is not None


def _hub_snapshot(repo: str, revision: str) -> Path:
    """The local snapshot directory of ``repo`` at ``revision`` (from the HF cache; downloaded if missing)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001  not in the cache: try the hub (fails at once when offline)
        pass
    try:
        return Path(snapshot_download(repo, revision=revision))
    except Exception as err:  # noqa: BLE001  the hub's errors, whatever their type: one line naming the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnknownModelError(
            f"--revision: {repo} at revision {revision!r} is not in the local HF cache and could not be "
            f"downloaded ({first})"
        ) from None


def resolve_model(spec: str) -> str:
    """The HF directory (or hub id) to load for ``spec``; converts a GGUF on first use."""
    spec = str(spec)
    if spec in MODELS:
        return str(converted_dir(MODELS[spec].gguf_path()))
    if match := _GGUF_ID.match(spec):
        cached = conversion_dir(match["prefix"])
        if source_of(cached) is None:
            raise UnknownModelError(
                f"model {spec} has no conversion in {cached.parent}; pass its .gguf file or name once to convert it"
            )
        return str(cached)
    if is_gguf_path(spec):
        return str(converted_dir(spec))
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if match := _HUB_AT_REVISION.match(spec):
        return str(_hub_snapshot(match["repo"], match["revision"]))
    if "/" not in spec:
        raise UnknownModelError(
            f"unknown model {spec!r}: not a file or directory, and not a named model ({', '.join(MODELS)}); "
            "pass an HF directory, a .gguf file, a hub id (owner/name) or a name from `ifedicl models list`"
        )
    return spec  # a hub id: transformers and vLLM resolve it (offline, from the local HF cache)


def model_identity(spec: str) -> str:
    """The id a command loads the model by (one per model wherever it is named from): a GGUF's content id,
    a hub id at the commit its revision resolved to, an absolute directory path, or the hub id."""
    resolved = resolve_model(spec)
    if (source := source_of(resolved)) is not None:
        return source.model_id
    if (match := _HUB_AT_REVISION.match(str(spec))) and not Path(spec).expanduser().exists():
        return f"{match['repo']}@{Path(resolved).name}"  # the snapshot folder is named by its commit
    path = Path(resolved)
    return str(path.resolve()) if path.exists() else resolved


def recorded_identity(model_id: str) -> str:
    """What a run records as its model and serving compares (the fingerprint's ``model_id``): a local HF
    directory's content digest (``dir@sha256:...``), not its path (a GGUF's conversion: the GGUF's id); any
    other id unchanged."""
    path = Path(model_id)
    if not path.is_dir():
        return model_id
    if (source := source_of(path)) is not None:  # a GGUF's conversion: the GGUF file's content id
        return source.model_id
    return f"dir@sha256:{directory_digest(path)}"


def _model_files(directory: Path) -> list[Path]:
    """The files that make up a model directory: every file below it except hidden ones (``.git``, the hub's
    ``.cache``) and Markdown (a model card)."""
    found = []
    for file in sorted(directory.rglob("*")):
        parts = file.relative_to(directory).parts
        if file.is_file() and not any(p.startswith(".") for p in parts) and file.suffix.lower() != ".md":
            found.append(file)
    return found


def directory_digest(directory: str | Path) -> str:
    """A content digest (sha256 hex, 32 characters) of a local model directory, cheap for large weights.

    Each file (:func:`_model_files`) contributes its relative path and size; a file up to 16 MiB (config,
    tokenizer, small weights) is hashed whole; a larger one by its ``.safetensors`` header if it is one (every
    tensor's name, dtype, shape and offsets) and 16 evenly spaced 1 MiB blocks (first and last included).
    16 MiB read per weight file: a different model (another checkpoint, a fine-tune: every weight changes)
    differs in what is read; an edit confined to unread bytes of a large file would not be seen.
    Cached per process by the files' paths, sizes and modification times.
    """
    directory = Path(directory).resolve()
    files = _model_files(directory)
    stats = tuple((f.relative_to(directory).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest(directory, stats)


@functools.lru_cache(maxsize=64)
def _digest(directory: Path, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _ in stats:
        digest.update(f"{name}\0{size}\0".encode())
        with open(directory / name, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                while block := f.read(1 << 20):
                    digest.update(block)
                continue
            if name.endswith(".safetensors"):
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(length, MAX_SAFETENSORS_HEADER)))
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]
