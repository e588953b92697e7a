"""Token ids -> mini-batches: seeded, shuffled, resumable, sliced per rank for any number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ...errors import SpraError
from ..config import TASKS
from .tokenizing import IGNORE, TokenizedData


class Batches:
    """Endless, seeded, shuffled (per epoch) mini-batches of a TokenizedData.

    Each step takes the next global batch of batch_size * world_size examples from the epoch's
    order (a permutation seeded by (seed, epoch)); rank r gets slice [r * batch_size, (r + 1) *
    batch_size) of it, so the global batches do not depend on the number of processes. An epoch
    ends when less than a global batch is left (the rest waits for a later epoch's order).
    With `group_by_length` the permutation is cut into groups of GROUP global batches, each group
    sorted by length and its batches put in a seeded random order: every batch holds examples of
    similar length (little padding) and the order stays random at the scale of groups.
    Batches: input_ids, attention_mask [B, T] right-padded with pad_id (T a multiple of `pad_to`);
    labels [B, T] (causal-lm, IGNORE at padding) or [B] (seq-cls); all int64.
    """

    GROUP = 64

    def __init__(
        self,
        data: TokenizedData,
        batch_size: int,
        seed: int,
        pad_id: int,
        task: str,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = False,
        pad_to: int = 1,
    ):
        if task not in TASKS:
            raise SpraError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if batch_size < 1:
            raise SpraError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise SpraError(f"seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.data, self.batch_size, self.seed, self.pad_id, self.task = data, batch_size, seed, pad_id, task
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.group_by_length, self.pad_to = group_by_length, pad_to
        self.global_batch = batch_size * world_size
        self.examples = len(data.input_ids)
        if self.examples < self.global_batch:
            raise SpraError(
                f"{self.examples} examples are fewer than one batch of {self.global_batch} "
                f"({batch_size} per process x {world_size} processes)"
            )
        self._epoch = 0
        self._position = 0  # examples of the current epoch's order already served, all ranks together
        self.examples_seen = 0  # all ranks together, since the start of training
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """Completed passes over the data."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.global_batch

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self._position + self.rank * self.batch_size
        batch = collate(
            self.data, self._epoch_order()[start : start + self.batch_size], self.pad_id, self.task, self.pad_to
        )
        self._position += self.global_batch
        self.examples_seen += self.global_batch
        self._wrap()
        return batch

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            rng = np.random.default_rng((self.seed, self._epoch))
            order = rng.permutation(self.examples) if self.shuffle else np.arange(self.examples)
            if self.group_by_length:
                order = self._grouped(order, rng)
            self._order = (self._epoch, order)
        return self._order[1]

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`order` with each group of GROUP global batches sorted by length (longest first, ties in
        order) and its whole batches shuffled; examples past the last whole batch stay at the end."""
        lengths = np.fromiter((len(ids) for ids in self.data.input_ids), dtype=np.int64, count=self.examples)
        size, whole = self.GROUP * self.global_batch, self.examples - self.examples % self.global_batch
        out = order.copy()
        for start in range(0, whole, size):
            group = order[start : min(start + size, whole)]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches = group.reshape(-1, self.global_batch)
            out[start : start + group.size] = batches[rng.permutation(len(batches))].reshape(-1)
        return out

    def _wrap(self) -> None:
        if self._position + self.global_batch > self.examples:
            self._epoch += 1
            self._position = 0

    def state_dict(self) -> dict:
        """JSON-able; with the same data and seed, load_state_dict continues bit-exactly (also
        under a different number of processes, as the position counts examples, not steps)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "examples_seen": self.examples_seen,
            "seed": self.seed,
            "examples": self.examples,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["examples"]) != (self.seed, self.examples):
            raise SpraError(
                f"cannot resume the data order: it was saved for {state['examples']} examples with seed "
                f"{state['seed']}, the data now has {self.examples} examples and seed {self.seed}"
            )
        self._epoch, self._position, self.examples_seen = state["epoch"], state["position"], state["examples_seen"]
        self._wrap()


def eval_batches(
    data: TokenizedData, batch_size: int, pad_id: int, task: str, pad_to: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass in file order, every example once; the last batch may be short."""
    n = len(data.input_ids)
    for start in range(0, n, batch_size):
        yield collate(data, range(start, min(start + batch_size, n)), pad_id, task, pad_to)


def collate(data: TokenizedData, indices, pad_id: int, task: str, pad_to: int = 1) -> dict[str, torch.Tensor]:
    """The examples at `indices`, right-padded with pad_id to the longest, rounded up to a multiple
    of `pad_to`."""
    rows = [data.input_ids[i] for i in indices]
    longest = max(map(len, rows))
    shape = (len(rows), -(-longest // pad_to) * pad_to)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    if task == "seq-cls":
        labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)  # [B]
    else:
        labels = torch.full(shape, IGNORE, dtype=torch.long)  # [B, T]
        for r, i in enumerate(indices):
            labels[r, : len(data.labels[i])] = torch.tensor(data.labels[i])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
