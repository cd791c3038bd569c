"""The "stream" input pipeline: batches decoded from the encoded images while training runs (grain
worker threads; PIL releases the GIL), for datasets larger than the accelerators' memory.

Each process decodes only the rows of every batch that its own devices hold, in the order the
"device" pipeline gathers them, so both pipelines feed the train step the same images.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from annotate.data import SplitSources


def local_rows(order: np.ndarray, batch_size: int, device_positions: Sequence[int],
               num_devices: int) -> np.ndarray:
    """This process's image indices, step after step: of each batch of `order` (consecutive
    `batch_size` entries, the last partial one dropped), the entries of the devices at
    `device_positions` of the mesh (each device holds batch_size / num_devices of a batch)."""
    per_device = batch_size // num_devices
    steps = len(order) // batch_size
    batches = np.asarray(order)[:steps * batch_size].reshape(steps, num_devices, per_device)
    return batches[:, list(device_positions)].reshape(-1)


def decoded_batches(sources: SplitSources, rows: np.ndarray, rows_per_batch: int,
                    image_size: int, *, num_threads: int = 16) -> Iterator[np.ndarray]:
    """uint8 batches [rows_per_batch, S, S, 3] of the images `rows` (in that order), decoded and
    resized by grain worker threads ahead of their use."""
    # the threads and the read-ahead work on images (two batches ahead), batched after them; a
    # buffer below the thread count would idle threads (and make grain warn at every epoch)
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=max(2 * rows_per_batch, num_threads))
    return iter(grain.MapDataset.source(np.asarray(rows))
                .map(lambda i: sources.decode(int(i), image_size))
                .to_iter_dataset(options)
                .batch(rows_per_batch, drop_remainder=True))
