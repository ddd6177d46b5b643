"""What ``--model`` may name, and the directory both backends load for it.

One spec, four forms, resolved the same way by every command and both backends:

- a named model (``smollm2-135m``, ``gemma3-270m``): its installed GGUF, converted;
- a ``.gguf`` file: converted once into the cache (:mod:`ifedicl.kernel.gguf_cache`);
- the id a run recorded for a GGUF model (``gguf:FILE@sha256:PREFIX``): its cached conversion;
- an HF directory or a hub id (``owner/name``): unchanged.

A GGUF model's identity is its file's content (:attr:`GgufSource.model_id`), whichever
form named it, so a run made from it is refused for any other model.
"""

from __future__ import annotations

import re
from pathlib import Path

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.gguf_cache import conversion_dir, converted_dir, is_gguf_path, source_of
from ifedicl.kernel.model_catalog import MODELS

_GGUF_ID = re.compile(r"^gguf:(?P<file>.+)@sha256:(?P<prefix>[0-9a-f]{16})$")


class UnknownModelError(IfediclError):
    """A ``--model`` that names nothing this machine can load."""


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
    if "/" not in spec:
        raise UnknownModelError(
            f"unknown model {spec!r}: not a file or directory, and not a named model ({', '.join(MODELS)}); "
            "pass an HF directory, a .gguf file, a hub id (owner/name) or a name from `ifedicl models list`"
        )
    return spec  # a hub id: transformers and vLLM resolve it (offline, from the local HF cache)


def model_identity(spec: str) -> str:
    """The id runs record: a GGUF's content id, an absolute directory path, or the hub id."""
    resolved = resolve_model(spec)
    if (source := source_of(resolved)) is not None:
        return source.model_id
    path = Path(resolved)
    return str(path.resolve()) if path.exists() else resolved
