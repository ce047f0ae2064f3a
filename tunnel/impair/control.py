"""The JSON-over-UDP control protocol of the jvpn-impair relay: both ends.

``_ControlServer`` is the relay's end (ImpairRelay inherits it): it reads commands from
the control socket and answers each one (set, stats, rebind, reset). :func:`control` is
the requester's end: send one command, wait for the reply.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from tunnel.impair.model import _FIELDS
from tunnel.impair.net import MAX_DATAGRAM, Address, _resolve, format_address

CONTROL_MAX_COMMAND: Final = 4096
"""Largest control command accepted; anything bigger gets an error reply."""

CONTROL_BATCH: Final = 16
"""Control datagrams handled per readiness callback."""


class _ControlServer:
    """The relay's end of the control socket; mixed into ImpairRelay.

    Uses the relay's control socket and its runtime-control methods, declared here for
    the type checker only.
    """

    _control: socket.socket | None

    if TYPE_CHECKING:

        def set(self, direction: str, **fields: object) -> None: ...

        def stats(self) -> dict[str, Any]: ...

        def rebind(self) -> int: ...

        def reset(self, *, counters: bool = False) -> None: ...

        def _impairment_dict(self) -> dict[str, dict[str, Any]]: ...

    # -- control socket ----------------------------------------------------------------

    def _on_control_readable(self) -> None:
        assert self._control is not None
        for _ in range(CONTROL_BATCH):
            try:
                data, peer = self._control.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            reply = self.handle_command(data)
            try:
                self._control.sendto(json.dumps(reply).encode(), peer)
            except OSError:
                pass  # the requester went away; it will time out, the relay goes on

    def handle_command(self, data: bytes) -> dict[str, Any]:
        """Execute one control-protocol command (JSON bytes) and return the reply dict.

        Never raises for bad input: every problem becomes ``{"ok": false, "error": ...}``.
        """
        if len(data) > CONTROL_MAX_COMMAND:
            return {"ok": False, "error": f"command larger than {CONTROL_MAX_COMMAND} bytes"}
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}"}
        if not isinstance(obj, dict):
            return {"ok": False, "error": "command must be a JSON object"}
        reply = self._command(obj)
        if "id" in obj:
            reply["id"] = obj["id"]
        return reply

    def _command(self, obj: dict[str, Any]) -> dict[str, Any]:
        cmd = obj.get("cmd")
        args = {k: v for k, v in obj.items() if k not in ("cmd", "id")}
        try:
            if cmd == "set":
                direction = args.pop("dir", "both")
                if not isinstance(direction, str):
                    raise ValueError(f"dir must be 'up', 'down' or 'both', got {direction!r}")
                if not args:
                    raise ValueError(f"set needs at least one field of: {', '.join(_FIELDS)}")
                self.set(direction, **args)
                return {"ok": True, "impairment": self._impairment_dict()}
            if cmd == "stats":
                _no_extra(cmd, args)
                return {"ok": True, "stats": self.stats()}
            if cmd == "rebind":
                _no_extra(cmd, args)
                return {"ok": True, "rebinds": self.rebind()}
            if cmd == "reset":
                counters = args.pop("counters", False)
                _no_extra(cmd, args)
                if not isinstance(counters, bool):
                    raise ValueError(f"counters must be true or false, got {counters!r}")
                self.reset(counters=counters)
                return {"ok": True, "impairment": self._impairment_dict()}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown cmd {cmd!r} (known: set, stats, rebind, reset)"}


def _no_extra(cmd: str, args: Mapping[str, object]) -> None:
    if args:
        raise ValueError(f"{cmd} takes no field {', '.join(sorted(args))}")


def control(addr: Address, obj: Mapping[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """Send one control command to a relay and return its JSON reply.

    Raises TimeoutError when no reply arrives within ``timeout`` seconds.
    """
    family, sockaddr = _resolve(addr, passive=False)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sockaddr)  # replies from anyone else are filtered by the kernel
        sock.send(json.dumps(dict(obj)).encode())
        try:
            data = sock.recv(MAX_DATAGRAM)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no reply from impair relay control {format_address(addr)}"
            ) from exc
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError(f"control reply is not a JSON object: {reply!r}")
    return reply
