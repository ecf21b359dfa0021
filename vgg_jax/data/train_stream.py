"""The training stream as a grain MapDataset whose element is a whole batch.

Element b of `TrainBatches` is batch b of one process's endless, shuffled, augmented
training stream. The global stream is: epoch e is a permutation of the split (a fresh one
per epoch, from the shuffle seed and e), and the example at global position g is
augmented with a generator of its own, derived from the augmentation seed and g alone.
Process p of P takes global positions p, p + P, p + 2P, ...; its batch b holds the next
`batch_size` of them. So batch b is a pure function of (seeds, b): the stream is
deterministic, the same for any number of grain workers (each worker builds whole
batches and grain interleaves them back in order), grain's iterator state records
positions only, and interleaving the per-process batches gives exactly the
single-process stream.

Why whole batches rather than grain's per-example chain (shuffle, repeat, random_map,
slice, batch): the per-example work around the transform is then a few array operations
per batch instead of five Python layers per example, and each crop is written straight
into its slot of the batch, so no batch is stacked on its way (measurements in
docs/input_pipeline.md, "Throughput").
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import grain
import numpy as np

from vgg_jax.data import transforms

# A batch straddles two epochs now and then (more when the split is smaller than a batch):
# the orders of the last few epochs are kept, each 4 bytes per example (5 MB on ImageNet).
_CACHED_EPOCHS = 3
# Philox's 128-bit key: the seed in the low 64-bit word, the example's position above.
_KEY_WORD_BITS = 64


class EpochPermutations:
    """The order of the split in each epoch: a fresh permutation per epoch.

    Args:
      size: the number of examples in the split.
      seed: the shuffle seed; epoch e's order comes from (seed, e) alone.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __call__(self, epoch: int) -> np.ndarray:
        """The source indices of epoch `epoch`, in the order it reads them.

        Args:
          epoch: the epoch, from 0.

        Returns:
          int [size] (int32 when it fits), a permutation of range(size).
        """
        order = self._cache.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            order = order.astype(np.int32 if self.size <= np.iinfo(np.int32).max else np.int64)
            self._cache[epoch] = order
            while len(self._cache) > _CACHED_EPOCHS:
                self._cache.popitem(last=False)
        return order

    def __getstate__(self) -> dict[str, Any]:
        # Workers receive the dataset pickled; they rebuild the orders they need.
        return {"size": self.size, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["size"], state["seed"])


def example_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the example at global stream position `position`.

    Philox keyed by (position, seed): distinct keys give independent streams, without a
    seed sequence per example. (Keying by the seed alone and starting each example's
    counter at its position would overlap neighbouring examples' streams, since one
    example draws several counter blocks.)

    Args:
      seed: the augmentation seed.
      position: the example's global position in the stream (over all processes).

    Returns:
      A fresh numpy Generator.
    """
    return np.random.Generator(np.random.Philox(key=(position << _KEY_WORD_BITS) | seed))


class TrainBatches(grain.MapDataset):
    """Endless batches of one process's training stream (see the module docstring).

    Args:
      source: random-access records {"image": bytes, "label": int, "name": str}.
      transform: the per-image augmentation.
      batch_size: examples per batch of this process.
      shuffle_seed: the seed of the epoch permutations.
      augment_seed: the seed of the per-example generators.
      process_index: this process.
      process_count: the number of processes.
    """

    def __init__(self, source: Any, transform: transforms.TrainAugmentation, *, batch_size: int,
                 shuffle_seed: int, augment_seed: int, process_index: int, process_count: int):
        super().__init__()
        self._source = source
        self._transform = transform
        self._batch_size = batch_size
        self._orders = EpochPermutations(len(source), shuffle_seed)
        self._augment_seed = augment_seed
        self._process_index = process_index
        self._process_count = process_count

    def __len__(self) -> int:
        return sys.maxsize  # Endless: epochs follow each other.

    def __str__(self) -> str:
        return f"TrainBatches(batch_size={self._batch_size}, process={self._process_index})"

    def positions(self, index: int) -> np.ndarray:
        """The global stream positions of the examples of batch `index`.

        Args:
          index: the batch, from 0.

        Returns:
          int64 [batch_size].
        """
        first = index * self._batch_size
        local = np.arange(first, first + self._batch_size, dtype=np.int64)
        return local * self._process_count + self._process_index

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        positions = self.positions(int(index))
        epochs, offsets = np.divmod(positions, self._orders.size)
        records = [self._source[int(self._orders(int(e))[o])] for e, o in zip(epochs, offsets)]
        return self._augment(records, positions)

    def _augment(self, records: list[dict[str, Any]], positions: np.ndarray) -> dict[str, Any]:
        size = self._transform.crop_size
        images = np.empty((len(records), size, size, 3), np.uint8)
        entries = [
            self._transform.augment_example(
                record, example_rng(self._augment_seed, int(position)), images[slot])
            for slot, (record, position) in enumerate(zip(records, positions))]
        # Each entry stacked over the batch: the colour shift, the decoding note, and what
        # else the task's examples carry (localisation's box targets).
        stacked = {key: np.stack([entry[key] for entry in entries]) for key in entries[0]}
        notes = stacked[transforms.DECODE_ERROR_KEY].astype(np.bytes_)
        return {
            **stacked,
            "image": images,
            "label": np.array([r["label"] for r in records], np.int32),
            "mask": notes == b"",
            transforms.DECODE_ERROR_KEY: notes,
        }
