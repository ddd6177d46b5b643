"""GGUF checkpoints as Hugging Face directories, converted once and cached.

Both backends load a plain HF directory (config.json, float safetensors, the
tokenizer): the HF path for extraction, calibration and the reference scores, and
vLLM for serving. Converting the GGUF file once, instead of letting each backend
dequantize it its own way, is what keeps the two paths on *identical* weights, so
their answers can be compared to 1e-3 (vLLM's own GGUF loader needs CUDA dequant
kernels that the CPU build lacks, and would keep quantized weights the HF path
never sees).

The cache lives in ``$IFEDICL_HOME/models`` (default ``$XDG_CACHE_HOME/ifedicl``,
else ``~/.cache/ifedicl``), one directory per file content (its sha256), so two
copies of one file share a conversion and a changed file never reuses a stale
one. A conversion is written to a private temporary directory and renamed into
place only when complete, under a file lock: concurrent processes (Ray actors,
two CLIs) convert once, and an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.gguf_header import GgufHeader, GgufHeaderError, NotGguf, read_header

# The identity written into every converted directory; its presence marks the conversion complete.
SOURCE_FILE = "ifedicl_source.json"
# general.architecture values whose HF and vLLM layouts the injection supports.
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


class GgufError(IfediclError):
    """A GGUF file that cannot be converted (unreadable, truncated, unsupported)."""


@dataclass(frozen=True)
class GgufSource:
    """Where a converted directory came from: the model's identity in the store."""

    file_name: str
    sha256: str
    architecture: str

    @property
    def model_id(self) -> str:
        """The id runs record: the file's content, not where it happens to lie on disk."""
        return f"gguf:{self.file_name}@sha256:{self.sha256[:16]}"


def cache_root() -> Path:
    """``$IFEDICL_HOME``, else ``$XDG_CACHE_HOME/ifedicl``, else ``~/.cache/ifedicl``."""
    if home := os.environ.get("IFEDICL_HOME"):
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ifedicl"


def conversion_dir(sha256_prefix: str) -> Path:
    """Where the conversion of the file whose sha256 starts with ``sha256_prefix`` (16 hex) lives."""
    return cache_root() / "models" / sha256_prefix[:16]


def is_gguf_path(spec: str) -> bool:
    return spec.lower().endswith(".gguf")


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, hashed once per process per (path, size, mtime)."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_checked_header(path: Path) -> GgufHeader:
    """The GGUF's header, checked: its magic, a readable header, the size its tensors need, an architecture.
    A one-line error for a corrupt or truncated file."""
    try:
        header = read_header(path)
    except NotGguf:
        raise GgufError(f"{path} is not a GGUF file (no GGUF magic); check the path or download it again") from None
    except GgufHeaderError as err:
        raise _corrupt(path, str(err)) from None
    size = path.stat().st_size
    if size < header.data_end:
        raise _corrupt(path, f"{size:,} bytes where its tensors need {header.data_end:,}")
    if not isinstance(header.metadata.get("general.architecture"), str):
        raise _corrupt(path, "no general.architecture")
    return header


def _corrupt(path: Path, why: str) -> GgufError:
    return GgufError(
        f"{path} is truncated or corrupt ({why}); download it again "
        "(for a named model: ifedicl models pull NAME --force)"
    )


def converted_dir(gguf_path: str | Path) -> Path:
    """The cached HF directory for ``gguf_path``, converting it on first use."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise GgufError(f"GGUF file {path} does not exist")
    sha = file_sha256(path)
    target = conversion_dir(sha)
    if (target / SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / SOURCE_FILE).is_file():  # another process converted it while we waited
            return target
        header = read_checked_header(path)
        architecture = header.metadata["general.architecture"]
        if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
            raise GgufError(
                f"{path.name}: GGUF architecture {architecture!r} is not supported; "
                f"supported: {sorted(SUPPORTED_GGUF_ARCHITECTURES)} (or pass an HF directory of a supported family)"
            )
        source = GgufSource(path.name, sha, architecture)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha[:16]}.", dir=target.parent))
        try:
            _convert(path, staging, source, header.metadata.get("tokenizer.ggml.add_bos_token"))
            staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover without SOURCE_FILE
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


_READER_SWAP = threading.Lock()  # gguf.GGUFReader is swapped process-wide while one conversion runs


@contextmanager
def _one_gguf_reader(path: Path) -> Iterator[None]:
    """Let transformers' three loads (tokenizer, config, weights) share one ``gguf.GGUFReader`` of ``path``.

    Each load builds its own reader, and building one indexes every metadata array element: ~28 s
    for Gemma 3's 262k-token vocabulary on 2 cores, three times per conversion. The reader is a
    read-only memory map, so sharing it changes nothing the loads see; any other file still gets
    its own reader.
    """
    import gguf

    build = gguf.GGUFReader
    with _READER_SWAP:
        shared = build(path)

        def reader(file, mode="r"):
            return shared if mode == "r" and Path(file) == path else build(file, mode)

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = build


def _convert(path: Path, out: Path, source: GgufSource, add_bos: bool | None) -> None:
    """Dequantize to float32 and save as a plain HF directory (safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    try:
        with _one_gguf_reader(path):
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            config = AutoConfig.from_pretrained(directory, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=name, config=config, dtype=torch.float32
            )
    except Exception as err:
        raise GgufError(f"cannot convert {path.name}: {type(err).__name__}: {err}") from None
    # save_pretrained refuses a GGUF-"quantized" model: rebuild a plain one around the dequantized tensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    # The BOS rule is the GGUF file's (tokenizer.ggml.add_bos_token): Gemma needs <bos> and the
    # tokenizer rebuilt from GGUF does not add it; SmolLM2 must not get one.
    if add_bos is not None:
        tokenizer.add_bos_token = bool(add_bos)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(
        json.dumps({"file_name": source.file_name, "sha256": source.sha256, "architecture": source.architecture})
    )


def source_of(directory: str | Path) -> GgufSource | None:
    """The GGUF a cached directory was converted from, or None for any other directory."""
    marker = Path(directory) / SOURCE_FILE
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text())
    return GgufSource(data["file_name"], data["sha256"], data["architecture"])
