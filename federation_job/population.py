"""Who federates: the task every client answers, and the clients, each with the data only it reads.

Two ways to make one, one client path after that:

- **Organisations' own data** (:meth:`Population.of`): a client list (``--config`` ``[[clients]]``),
  each client naming its data on the node it runs on. The driver never opens any of it: it knows
  the task (agreed by all, not private) and each client's name, placement and counts.
- **The simulation** (:meth:`Population.simulate`, the paper's setting, the report and the demo):
  one data set split by a Dirichlet(α) label skew. The partitioner reads the labels to draw the
  split (the simulation's operator owns that data set) and hands each simulated client the
  indices of its shard; each client then reads the data set itself and takes its shard, through
  exactly the same client path. The data set's test split stays with the server as its held-out set.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ifedicl.federation_job.partition import dirichlet_partition
from ifedicl.kernel.data import Split
from ifedicl.kernel.errors import IfediclError
from ifedicl.kernel.sources import ClientSource, DataSource
from ifedicl.kernel.task import TaskSpec


@dataclass(frozen=True)
class Population:
    task: TaskSpec
    clients: tuple[ClientSource, ...]
    server_test: Split = field(default_factory=Split)  # a held-out set the server scores itself (may be empty)
    origin: dict = field(default_factory=dict)  # what the run records about where its clients came from

    @classmethod
    def of(cls, task: TaskSpec, clients: list[ClientSource] | tuple[ClientSource, ...]) -> Population:
        """Clients with their own data; checked for what the server can check without reading it."""
        if not clients:
            raise IfediclError("a federation needs at least one client")
        for client in clients:
            if not isinstance(client.name, str) or not client.name.strip():
                raise IfediclError(f"every client needs a non-empty name (got {client.name!r})")
        repeated = sorted(name for name, n in Counter(c.name for c in clients).items() if n > 1)
        if repeated:
            raise IfediclError(f"client names must be unique: {', '.join(map(repr, repeated))} given more than once")
        origin = {"clients": [{"name": c.name, "placement": c.placement} for c in clients]}
        return cls(task, tuple(clients), Split(), origin)

    @classmethod
    def simulate(cls, source: DataSource, clients: int, alpha: float, seed: int, min_shard: int) -> Population:
        """The Dirichlet(``alpha``) split of ``source``'s training split over ``clients`` simulated clients."""
        data = source.load()
        shards = dirichlet_partition(data.train.labels, clients, alpha, seed, min_shard)
        members = tuple(
            ClientSource(f"client-{i}", source, indices=tuple(shard))
            for i, shard in enumerate(shards)
        )
        origin = {"source": asdict(source), "partition": {"alpha": alpha, "seed": seed, "min_shard": min_shard}}
        return cls(data.task, members, data.test, origin)

    @property
    def names(self) -> dict[int, str]:
        """Client id (its index, what the rounds record) -> its name."""
        return {cid: client.name for cid, client in enumerate(self.clients)}
