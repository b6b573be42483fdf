"""SpareMachines without KVM: one machine built ahead per key, handed out
once, closed when it is not wanted."""

from __future__ import annotations

import threading

from vmm.snapshot.spare import SpareMachines


class Thing:
    def __init__(self, key):
        self.key, self.closed = key, False

    def close(self):
        self.closed = True


def test_a_requested_spare_is_handed_out_once_for_its_key():
    built = []
    spares = SpareMachines(lambda key: built.append(Thing(key)) or built[-1])
    try:
        assert spares.take("a") is None  # nothing requested yet
        spares.request("a")
        got = spares.take("a")  # waits for the build in flight
        assert got is built[0] and got.key == "a" and not got.closed
        assert spares.take("a") is None and spares.taken == 1
    finally:
        spares.close()


def test_a_spare_is_built_from_the_spec_of_the_request_that_asked_for_it():
    # The zygote keys spares by what a machine depends on and builds them
    # from the asking fork's whole configuration.
    built = []
    spares = SpareMachines(lambda spec: built.append(Thing(spec)) or built[-1])
    try:
        spares.request("a", {"memory": 64, "timeout": 5})
        got = spares.take("a")
        assert got.key == {"memory": 64, "timeout": 5}
        spares.request("b", {"memory": 128})
        assert spares.take("a") is None  # built for key b, closed
        assert built[-1].key == {"memory": 128} and built[-1].closed
    finally:
        spares.close()


def test_a_spare_for_another_key_is_closed_not_handed_out():
    built = []
    spares = SpareMachines(lambda key: built.append(Thing(key)) or built[-1])
    try:
        spares.request("a")
        assert spares.take("b") is None
        assert built[0].closed and spares.taken == 0
        spares.request("a")
        spares.take("a")
        spares.request("a")
        spares.request("b")  # replaces a ready spare of another key (after the build in flight)
        assert spares.take("b").key == "b"
    finally:
        spares.close()


def test_a_failed_build_gives_none_and_the_next_request_builds_again():
    calls = []

    def build(key):
        calls.append(key)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return Thing(key)

    spares = SpareMachines(build)
    try:
        spares.request("a")
        assert spares.take("a") is None and spares.failed == 1
        spares.request("a")
        assert spares.take("a").key == "a"
    finally:
        spares.close()


def test_close_waits_for_a_build_and_closes_what_is_left():
    release = threading.Event()
    built = []

    def slow(key):
        release.wait(5)
        built.append(Thing(key))
        return built[-1]

    spares = SpareMachines(slow)
    spares.request("a")
    closer = threading.Thread(target=spares.close)
    closer.start()
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert all(t.closed for t in built)
    spares.request("a")  # closed: nothing more is built
    assert spares.take("a") is None
