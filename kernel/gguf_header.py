"""A GGUF file's metadata and expected size, read straight from its header.

Why not ``gguf.GGUFReader``: it builds every field up front, one numpy memmap view per string,
and a model's tokenizer vocabulary is tens of thousands of them (SmolLM2: 49k, Gemma 3: 262k).
One such parse took 11 s for SmolLM2 on 2 cores; this walk takes a fraction of a second, and
conversion needs only a few scalars (``general.architecture``, ``tokenizer.ggml.add_bos_token``)
plus the size the tensor data must reach, to tell a truncated download before converting it.

Layout (GGUF v2 and v3): magic, version, tensor count, key-value count, the key-value pairs,
the tensor infos, then the tensor data at the next multiple of ``general.alignment``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

GGUF_MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
DEFAULT_ALIGNMENT = 32


class GgufHeaderError(ValueError):
    """The header cannot be read: an unsupported version, or cut short."""


class NotGguf(GgufHeaderError):
    """The file does not start with the GGUF magic."""


@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, object]  # scalar and string values; arrays (the vocabulary) are skipped
    tensor_count: int
    data_end: int  # bytes the file must have for all its tensor data


class _Cursor:
    def __init__(self, buffer, byte_order: str):
        self.buffer, self.order, self.offset = buffer, byte_order, 0

    def scalar(self, code: str):
        (value,) = struct.unpack_from(self.order + code, self.buffer, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        end = self.offset + length
        if end > len(self.buffer):
            raise GgufHeaderError("the header is cut short (a string runs past the end of the file)")
        text = bytes(self.buffer[self.offset : end]).decode("utf-8", errors="replace")
        self.offset = end
        return text

    def value(self, value_type: int):
        """The value of ``value_type``; an array is walked past and comes back as None."""
        if value_type == STRING:
            return self.string()
        if value_type in SCALARS:
            return self.scalar(SCALARS[value_type])
        if value_type != ARRAY:
            raise GgufHeaderError(f"unknown value type {value_type}")
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in SCALARS:
            self.offset += count * struct.calcsize(SCALARS[item_type])
        else:
            for _ in range(count):
                self.value(item_type)
        return None


def read_header(path: Path) -> GgufHeader:
    """Metadata and expected size of the GGUF at ``path``; :class:`GgufHeaderError` if it cannot be read."""
    from gguf.constants import GGML_QUANT_SIZES  # block size and bytes per block of each tensor type

    with open(path, "rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise NotGguf("no GGUF magic")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        byte_order = "<" if struct.unpack_from("<I", buffer, 4)[0] < 0x10000 else ">"
        cursor = _Cursor(buffer, byte_order)
        cursor.offset = 4
        try:
            version = cursor.scalar("I")
            if version < 2:
                raise GgufHeaderError(f"GGUF version {version} is not supported (2 or later)")
            tensor_count, kv_count = cursor.scalar("Q"), cursor.scalar("Q")
            metadata = {}
            for _ in range(kv_count):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.scalar("I"))
            data_end = 0
            for _ in range(tensor_count):
                cursor.string()  # name
                dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]
                tensor_type, offset = cursor.scalar("I"), cursor.scalar("Q")
                block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
                data_end = max(data_end, offset + prod(dims) // block_size * block_bytes)
        except GgufHeaderError:
            raise
        except (struct.error, KeyError, ValueError) as err:
            raise GgufHeaderError(f"the header is cut short or corrupt ({type(err).__name__}: {err})") from None
        alignment = metadata.get("general.alignment") or DEFAULT_ALIGNMENT
        data_start = -(-cursor.offset // alignment) * alignment
        return GgufHeader(metadata, tensor_count, data_start + data_end)
