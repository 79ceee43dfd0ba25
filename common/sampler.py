"""One resumable data order for every consumer: a fresh seeded permutation per epoch, walked by a cursor.

A learner rank's SFT data (key: seed, rank) and a rollout worker's prompts (key: seed, actor) are visited with the
same sampler, so both runners see data in the same order for the same key, and a checkpoint that saves
(epoch, cursor) resumes exactly where the run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochSampler:
    n: int  # items to visit
    key: tuple[int, ...]  # the seed sequence of the permutations: (seed, rank) or (seed, actor)
    epoch: int = 0
    cursor: int = 0
    _order: tuple[int, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def take(self, k: int) -> list[int]:
        """The next k indices (across epoch boundaries)."""
        if self.n < 1:
            raise ValueError("nothing to sample from (0 items)")
        out: list[int] = []
        while len(out) < k:
            if self.cursor >= self.n:
                self.epoch += 1
                self.cursor = 0
            order = self.order()
            j = min(self.n, self.cursor + k - len(out))
            out += [int(i) for i in order[self.cursor : j]]
            self.cursor = j
        return out

    def order(self) -> np.ndarray:
        """This epoch's permutation: np.random.default_rng([*key, epoch])."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([*self.key, self.epoch]).permutation(self.n))
        return self._order[1]

    def state(self) -> dict:
        return {"n": self.n, "key": list(self.key), "epoch": self.epoch, "cursor": self.cursor}

    def fits(self, state: dict) -> bool:
        """Whether a saved position belongs to this data set and key (a run started from another run's checkpoint
        with another seed or data starts its own order instead)."""
        return state["n"] == self.n and list(state["key"]) == list(self.key)

    def load(self, state: dict) -> None:
        """Continue from a saved position; refuses one saved for another data set or seed."""
        if not self.fits(state):
            raise ValueError(
                f"sampler state for {state['n']} items with key {state['key']} does not fit {self.n} items with key {list(self.key)}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
