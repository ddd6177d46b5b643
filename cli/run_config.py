"""``--config FILE``: a TOML run configuration (as Flower's run config) for federate, recalibrate and eval.

Top-level keys are the command's long flags with underscores (``rounds = 3``, ``local_epochs = 0.25``);
they become the flags' defaults, so a flag given on the command line overrides the file. Two tables
are not flags: ``[task]`` (``name``, ``template``, ``labels``: what every client's data is labelled
for) and ``[[clients]]``, one per client (``name``, ``data``, optionally ``placement``, ``test``, and ``split``/
``test_split``: which split of its task directory or HF dataset it trains on and holds out; default: the flags),
which replaces ``--task-dir``/``--dataset``: each client reads its own ``data`` on the node it runs
on, and the driver never opens it. A relative path is resolved by the client on its node: from that node's
``IFEDICL_DATA_ROOT`` if set (where the organisation mounts its data), else from the config file's folder.

    [task]
    name = "tickets"
    template = "Ticket: {text}\\nTeam:"
    labels = ["billing", "network"]

    [[clients]]
    name = "org-a"
    data = "/data/org-a/train.jsonl"
    test = "/data/org-a/test.jsonl"
    placement = "org-a"          # a custom resource (or label:KEY=VALUE) of the node holding the data
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
import typer

from ifedicl.kernel.errors import IfediclError

if TYPE_CHECKING:  # --help must not import torch or Ray
    from ifedicl.federation_job.population import Population

TABLES = ("task", "clients")  # keys of the file that are not flags
CLIENT_KEYS = {"name", "data", "placement", "test", "split", "test_split"}


class ConfigError(IfediclError):
    """The run configuration file cannot be used as it is."""


@dataclass(frozen=True)
class RunConfig:
    path: Path
    flags: dict  # flag name (underscores) -> value
    task: dict | None
    clients: list[dict] | None

    @classmethod
    def read(cls, path: Path) -> RunConfig:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config: cannot read {path} ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config: {path} is not valid TOML ({err})") from None
        clients = raw.pop("clients", None)
        if clients is not None and not isinstance(clients, list):  # `clients = 4` is the --clients flag
            raw["clients"], clients = clients, None
        task = raw.pop("task", None)
        if task is not None and (not isinstance(task, dict) or set(task) - {"name", "template", "labels"}):
            raise ConfigError(f"--config {path}: [task] takes name, template and a list of labels")
        return cls(Path(path), raw, task, clients)

    def population(
        self,
        text_field: str = "text",
        label_field: str = "label",
        split: str | None = None,
        test_split: str | None = None,
    ) -> Population | None:
        """The clients the file lists, with their own data (None if it lists none: the flags name the data);
        every client's rows hold their text and label in ``text_field`` and ``label_field``; a client trains on
        its ``split`` and holds out its ``test_split`` (its own keys, else these: ``--split``/``--test-split``)."""
        if self.clients is None:
            return None
        from ifedicl.federation_job.population import Population
        from ifedicl.kernel.sources import ClientSource, DataSource
        from ifedicl.kernel.task import TaskSpec

        if self.task is None:
            raise ConfigError(f"--config {self.path}: [[clients]] needs a [task] table (name, template, labels)")
        if not isinstance(self.task.get("labels"), list):
            raise ConfigError(f"--config {self.path}: [task] takes name, template and a list of labels")
        task = TaskSpec(self.task.get("name", ""), self.task.get("template", ""), tuple(self.task["labels"]))

        def located(location: str, **splits) -> DataSource:
            source = replace(DataSource.at(location, task), text_field=text_field, label_field=label_field)
            return source if source.kind == "file" else replace(source, **splits)

        members = []
        for i, entry in enumerate(self.clients):
            if not isinstance(entry, dict):
                raise ConfigError(f"--config {self.path}: each [[clients]] entry must be a table")
            where = f"--config {self.path}: client {entry.get('name', i + 1)!r}"
            unknown = sorted(set(entry) - CLIENT_KEYS)
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown} (use {sorted(CLIENT_KEYS)})")
            if not isinstance(entry.get("data"), str) or not entry["data"]:
                raise ConfigError(f"{where}: needs data = a task directory or data file on the client's node")
            own = {"split": entry.get("split", split), "test_split": entry.get("test_split", test_split)}
            for key in ("split", "test_split"):
                if key in entry and (not isinstance(entry[key], str) or not entry[key]):
                    raise ConfigError(f"{where}: {key} must be a split name (a string)")
            test = entry.get("test")
            train = located(entry["data"], **own)
            held_out = located(test, test_split=own["test_split"]) if test else None
            held_out = held_out or (train if train.kind != "file" else None)
            for key, source in (("split", train), ("test_split", held_out or train)):
                if key in entry and source.kind == "file":  # a file is one split: naming one is a mistake
                    raise ConfigError(
                        f"{where}: {key} names a split of a task directory or HF dataset, not of the data file "
                        f"{source.location}"
                    )
            root = str(self.path.parent.resolve())  # relative paths: from here, unless the node sets a data root
            members.append(ClientSource(str(entry.get("name", "")), train, held_out, entry.get("placement"), root=root))
        try:
            return Population.of(task, members)
        except IfediclError as err:
            raise ConfigError(f"--config {self.path}: {err}") from None


def apply_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """The ``--config`` callback (eager): the file's flags become the command's defaults, so the command
    line still wins. A key that is no flag of this command is an error naming it."""
    if value is None:
        return None
    config = RunConfig.read(value)
    flags = {p.name for p in ctx.command.params if p.name != "config"}
    unknown = sorted(set(config.flags) - flags)
    if unknown:
        raise ConfigError(
            f"--config {value}: {', '.join(map(repr, unknown))} is not a flag of `ifedicl {ctx.info_name}` "
            "(top-level keys are its long flags with underscores)"
        )
    ctx.default_map = {**(ctx.default_map or {}), **config.flags}
    return value


def config_option():
    """The ``--config`` option a command declares (``config: Path | None = config_option()``)."""
    return typer.Option(
        None, "--config", is_eager=True, callback=apply_config, exists=False, dir_okay=False,
        help="TOML run configuration: top-level keys are these flags with underscores (flags given here win); "
        "\\[task] and \\[\\[clients]] (name, data, placement, test, split, test_split) federate clients that each "
        "read their own data",
    )  # fmt: skip


def federation_clients(config: Path | None, **source):
    """Who a federating command federates: the ``[[clients]]`` of ``--config`` (each with its own data), or
    the one data set ``source`` names (:meth:`DataSource.from_options`' arguments: ``--task-dir``/``--dataset``
    and the rest), split over simulated clients. Its ``text_field``/``label_field`` name the columns in either,
    its ``split``/``test_split`` the splits (a client's own keys win)."""
    from ifedicl.kernel.sources import DataSource

    columns = (source.get("text_field", "text"), source.get("label_field", "label"))
    splits = (source.get("split"), source.get("test_split"))
    population = RunConfig.read(config).population(*columns, *splits) if config else None
    if population is None:
        return DataSource.from_options(**source)
    if source.get("task_dir") or source.get("dataset"):
        raise ConfigError(f"--config {config} lists [[clients]] with their own data: drop --task-dir/--dataset")
    return population
