"""What a run measures, and for how long: the full run and the quick one."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.servers import SERVERS
from bench.workloads import NAMES

STARTUP_ESTIMATE = {"tiny": 6.0, "embed": 12.0}


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool = False
    workloads: tuple[str, ...] = NAMES
    servers: tuple[str, ...] = tuple(spec.name for spec in SERVERS)
    concurrencies: tuple[int, ...] = (1, 8, 32, 128, 256)
    # tiny only, one more closed-loop point: as many connections as a crowd of
    # independent clients opens (embed's queue sheds most of them, by design)
    crowd: int = 1000
    load_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.8, 1.0, 1.2)
    closed_seconds: float = 5.0
    open_seconds: float = 5.0
    warmup_seconds: float = 2.0
    offline_seconds: float = 2.0
    timeout_scale: float = 1.0  # of each workload's request timeout
    sample_scale: float = 1.0  # of the sample each server answers alone, checked in full
    # the open-loop generator opens a connection whenever every open one is
    # busy, as a crowd of independent clients would, up to this many
    max_connections: int = 1024

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick_run(cls) -> Plan:
        return cls(
            quick=True,
            concurrencies=(1, 32, 128),
            load_fractions=(0.5, 0.8),
            closed_seconds=2.0,
            open_seconds=2.0,
            warmup_seconds=1.0,
            offline_seconds=0.5,
            timeout_scale=0.25,
            sample_scale=0.5,
        )

    def only(self, workloads: tuple[str, ...] | None, servers: tuple[str, ...] | None) -> Plan:
        return replace(
            self,
            workloads=workloads or self.workloads,
            servers=servers or self.servers,
        )

    def concurrencies_for(self, workload: str) -> tuple[int, ...]:
        """The closed-loop points of ``workload``: the crowd for tiny only."""
        return (*self.concurrencies, self.crowd) if workload == "tiny" else self.concurrencies

    def seconds_per_point(self, mode: str) -> float:
        """Planned seconds of one point, idle wait included."""
        return (self.closed_seconds if mode == "closed" else self.open_seconds) + 0.7

    def offline_estimate(self) -> float:
        sizes = 3 if self.quick else 8
        return sizes * len(self.workloads) * (self.offline_seconds + 0.3) + 15

    def planned_seconds(self) -> float:
        """Roughly how long the run takes: what the progress bar counts down."""
        total = self.offline_estimate()
        serves = {spec.name: spec.workloads for spec in SERVERS}
        transports_of = {spec.name: len(spec.transports) for spec in SERVERS}
        for workload in self.workloads:
            for server in (s for s in self.servers if workload in serves[s]):
                transports = transports_of[server]
                total += STARTUP_ESTIMATE[workload] + self.warmup_seconds + 2
                points = len(self.concurrencies_for(workload))
                total += transports * points * self.seconds_per_point("closed")
                total += len(self.load_fractions) * self.seconds_per_point("open")
        return total
