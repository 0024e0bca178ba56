"""The statistics an optimizer reports to the training log, as a declared interface: the loop asks
`isinstance(optimizer, SubspaceStats)`, never whether some method happens to exist."""
from __future__ import annotations

import abc


class SubspaceStats(abc.ABC):
    """An optimizer that tracks low-rank subspaces and reports how far they moved."""

    @abc.abstractmethod
    def pop_subspace_stats(self) -> dict[str, float] | None:
        """{"count", "angle_mean", "angle_max"} of the subspace updates since the last call, then reset
        (None or count 0: nothing moved). Collective for a sharded optimizer: every rank calls it."""
