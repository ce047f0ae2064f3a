"""Seed failure-isolation-model.md made executable: one module per seed section.

Every test runs the real programs as subprocesses (``jvpn-gateway`` with ``inner_echo``,
``jvpn-tui --headless`` with the memory inner side, ``jvpn-impair`` relays on loopback)
and reads their JSON event lines; see :mod:`tests.test_failure_isolation.harness`.
docs/failure-isolation.md maps every seed rule to the code and the test.
"""
