"""The sans-I/O protocol core: bytes and ``now`` in; datagrams, TUN packets and events out.

Nothing in this package opens a socket, starts a thread, sleeps or reads a clock.
"""
