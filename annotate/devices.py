"""Devices: the data-parallel mesh, host arrays onto it, and JAX's persistent compilation cache."""
from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis "data"."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The layout that holds a whole array on every device of `mesh` (data, parameters)."""
    return NamedSharding(mesh, PartitionSpec())


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


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-device-memory error (a buffer, a dataset or a step's activations that
    do not fit), which the apps name with the settings that lower their memory."""
    return isinstance(error, jax.errors.JaxRuntimeError) and \
        str(error).startswith("RESOURCE_EXHAUSTED")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: int = 300) -> None:
    """Join a multi-process run (jax.distributed): with the three values given, or detected from
    SLURM, Open MPI and the other clusters jax knows when they are None. On CPU devices the
    processes talk through gloo."""
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, num_processes={num_processes})")
    if coordinator_address is not None:  # checked after the values, so that a wrong process_id
        check_coordinator(coordinator_address, process_id, timeout_s)  # fails before any wait
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def check_coordinator(address: str, process_id: int | None, timeout_s: float) -> None:
    """Say, as an exception, what jax.distributed would meet by aborting the interpreter (a
    segfault, or status 134 after its timeout): ValueError for an address that is not HOST:PORT;
    for process 0, which serves the coordinator, OSError when the port is taken on this host;
    for the others, TimeoutError when nothing accepts connections there within `timeout_s`."""
    host, separator, port_text = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    port = int(port_text) if port_text.isdigit() else 0
    if not (separator and host and 0 < port < 65536):
        raise ValueError(f"coordinator address {address!r} is not HOST:PORT")
    if process_id == 0:  # jax serves on every interface ([::]:port)
        family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                probe.bind(("::" if family == socket.AF_INET6 else "", port))
            except OSError as error:
                raise OSError(f"process 0 serves the coordinator on port {port} of this host, "
                              f"which it cannot take ({error.strerror or error}); pick a free "
                              f"port for --coordinator_address") from None
        return
    if process_id is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no coordinator answered at {address} within {timeout_s:g} s "
                    f"({error.strerror or error}); start process 0 with the same "
                    f"--coordinator_address on that host, or correct the address") from None
            time.sleep(0.5)


def enable_compilation_cache() -> str:
    """Turn on JAX's persistent compilation cache, so that a rerun, resumed or evaluated
    experiment loads its compiled steps (same shapes) instead of compiling them again.
    The folder is $JAX_COMPILATION_CACHE_DIR (read by JAX itself) or, by default,
    $XDG_CACHE_HOME/annotate/jax (~/.cache/annotate/jax). Every compilation is kept, however
    short (unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise): a model's eager
    initialisers are dozens of compilations of a fraction of a second each, most of a CPU
    run's start. Call before the first compilation; returns the folder."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                       ".cache")
        directory = os.path.join(cache_home, "annotate", "jax")
        jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
