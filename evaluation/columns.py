"""The grid's result columns: which methods train (one column per objective) and which only prompt (one column),
a column's key and its label, and the short name a model or task location goes by in folders and tables.

The grid names its groups' columns with these, the renderers label them and the progress lines print them.
"""

from __future__ import annotations

from ifedicl.evaluation.settings import METHOD_LABELS, METHODS

TRAINABLE = ("i2cl_central", "local_calibration", "fedavg_lora", "ifedicl")
PROMPT_ONLY = tuple(m for m in METHODS if m not in TRAINABLE)


def safe_name(name: str) -> str:
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def column_key(method: str, objective: str) -> str:
    return method if method in PROMPT_ONLY else f"{method}@{objective}"


def column_label(column: str) -> str:
    column, _, variant = column.partition("#")
    method, _, objective = column.partition("@")
    return METHOD_LABELS[method] + (f" [{objective}]" if objective else "") + (f" {variant}" if variant else "")


def columns_of(methods: list[str], objectives: list[str]) -> list[str]:
    """The report's columns in table order: the prompt-only methods once, then each trainable one per objective."""
    out = [m for m in PROMPT_ONLY if m in methods]
    for m in TRAINABLE:
        if m in methods:
            out += [column_key(m, o) for o in objectives]
    return out
