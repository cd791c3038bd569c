"""Devices: the data-parallel mesh, host arrays onto it, and JAX's persistent compilation cache."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global jax.Array laid out by `sharding`."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (in a multi-process run it spans devices of other
    processes, so it is read from a local copy)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    return np.asarray(array.addressable_data(0))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300) -> None:
    """Join a multi-process run (jax.distributed): with the three values given, or detected from
    SLURM, Open MPI and the other clusters jax knows when they are None. On CPU devices the
    processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache, so that a rerun, resumed or evaluated
    experiment loads its compiled steps (same shapes) instead of compiling them again.
    The folder is $JAX_COMPILATION_CACHE_DIR (read by JAX itself) or, by default,
    $XDG_CACHE_HOME/annotate/jax (~/.cache/annotate/jax). Call before the first compilation;
    returns the folder."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                       ".cache")
        directory = os.path.join(cache_home, "annotate", "jax")
        jax.config.update("jax_compilation_cache_dir", directory)
    return directory
