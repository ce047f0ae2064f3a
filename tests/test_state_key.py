"""The state key file when several gateway processes start at once.

docs/gateway.md: every worker of a gateway opens the same state key; the first start
creates it (mode 0600). A clean-clone run of the quick start saw the second worker refuse
to start ("cannot create: File exists") because the first had just created the file.
Whatever the interleaving, every process must get the same key and none may fail.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from tunnel.ownership.statekey import STATE_KEY_LEN, StateKeyError, load_state_key

ROUNDS = 200
"""Fresh key files raced; each round must give every starter one key."""
STARTERS = 4


def _race(path: Path) -> list[bytes | BaseException]:
    barrier = threading.Barrier(STARTERS)
    results: list[bytes | BaseException] = [b""] * STARTERS

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = load_state_key(path)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(STARTERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_starters_racing_on_a_missing_key_all_get_the_one_key(tmp_path: Path) -> None:
    for n in range(ROUNDS):
        path = tmp_path / f"r{n}" / "state.key"
        results = _race(path)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"round {n}: {errors[0]!r}"
        assert len(set(results)) == 1, f"round {n}: starters got different keys"
        assert len(results[0]) == STATE_KEY_LEN  # type: ignore[arg-type]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert os.listdir(path.parent) == ["state.key"], "a temporary file was left behind"
        assert load_state_key(path) == results[0]


def test_a_key_readable_by_others_is_refused_with_the_fixing_command(tmp_path: Path) -> None:
    path = tmp_path / "state.key"
    key = load_state_key(path)
    assert load_state_key(path) == key
    path.chmod(0o644)
    with pytest.raises(StateKeyError, match="chmod 600"):
        load_state_key(path)
