"""annotate.devices.check_coordinator and initialize_distributed: what jax.distributed would meet by aborting the
interpreter (a segfault for a taken port, status 134 after its timeout for a missing
coordinator, an IndexError for an address without a port) is an exception naming it."""
from __future__ import annotations

import socket
import time

import pytest

from annotate.devices import check_coordinator, initialize_distributed


@pytest.fixture
def listening_port():
    """A port of this host on which a socket listens, as a started coordinator does."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as server:
        server.bind(("::" if socket.has_ipv6 else "", 0))
        server.listen()
        yield server.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":1234", "host:http",
                                     "host:70000"])
def test_an_address_that_is_not_host_port_is_named(address):
    with pytest.raises(ValueError, match=f"coordinator address '{address}' is not HOST:PORT"):
        check_coordinator(address, 1, timeout_s=1)


def test_process_0_names_a_port_already_taken(listening_port):
    with pytest.raises(OSError, match=f"on port {listening_port} of this host, which it cannot "
                                      f"take \\(Address already in use\\)"):
        check_coordinator(f"127.0.0.1:{listening_port}", 0, timeout_s=1)
    check_coordinator(f"127.0.0.1:{_free_port()}", 0, timeout_s=1)  # a free one is taken later


def test_other_processes_wait_for_the_coordinator_then_name_its_absence(listening_port):
    check_coordinator(f"127.0.0.1:{listening_port}", 1, timeout_s=1)  # answers: returns
    check_coordinator("[::1]:1234", None, timeout_s=1)  # an IPv6 literal; index detected later
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"no coordinator answered at {address} within 1.5 s "
                                           f"\\(Connection refused\\); start process 0"):
        check_coordinator(address, 1, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - started < 5


@pytest.mark.parametrize("process_id", [2, 5, -1])
def test_a_process_id_out_of_range_is_named_before_any_wait(process_id):
    """Nothing listens at the address: were the coordinator waited for first, this would take
    the whole timeout before jax named the index."""
    started = time.monotonic()
    with pytest.raises(ValueError, match=f"process_id {process_id} is not in "
                                         f"\\[0, num_processes=2\\)"):
        initialize_distributed(f"127.0.0.1:{_free_port()}", 2, process_id, timeout_s=30)
    assert time.monotonic() - started < 5
