"""One control socket for a gateway of N workers: the supervisor's, fanned out to theirs.

With ``workers`` > 1 the supervisor (tunnel/gateway/workers.py) serves the public control
socket (``[control] socket``); each worker serves a private one (0600, in the private
directory the supervisor creates: ``wK.sock``). :class:`CombinedControl` is the
:class:`~tunnel.control.server.ControlTarget` of the public socket and answers from the
workers' (docs/gateway.md "Workers"):

- ``status``: every worker is asked at once, each for at most :data:`ASK_TIMEOUT_S`; the
  answer lists every worker's sessions (each with its ``worker``), sums their counters
  and names each worker with its pid and, for one that did not answer (not running,
  restarting, too slow), why: a dead or stuck worker never hangs the answer;
- ``watch``: the supervisor follows every worker's event stream (reconnecting to a
  restarted worker) and merges them into one stream and one history ring;
- ``reload_policy`` reaches every worker, and the reply says per worker what happened
  (ok only if every worker reloaded); ``terminate SESSION`` finds the session among every
  worker's (a prefix must name one session of all of them) and asks its worker; the
  client's commands are refused by a worker, as by one gateway process.

It runs on an asyncio loop of its own, on a thread of the supervisor (whose main thread
waits for signals and children).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from tunnel.control.protocol import (
    MAX_LINE,
    Command,
    ControlError,
    Error,
    EventMsg,
    GatewayStatus,
    GatewayTraffic,
    GatewayWorkerStatus,
    Hello,
    Message,
    Request,
    Result,
    Status,
    StatusReply,
    Watch,
    decode_reply,
    encode,
    gateway_status,
)  # fmt: skip
from tunnel.control.server import ControlServer
from tunnel.gateway.control import HISTORY_SIZE, HISTORY_TYPES, STATUS_INTERVAL_S, one_match

ASK_TIMEOUT_S: Final = 2.0
"""How long the supervisor waits for one worker's answer; a worker slower than this is
named in the reply (``no answer in 2s``) instead of holding it up."""

FOLLOW_RETRY_S: Final = 0.5
"""A worker's event stream that ended (the worker died or restarts) is tried again this often."""

CLOSE_FLUSH_S: Final = 1.0
"""At the end, how long watchers get to read the last events."""

_HISTORY_NAMES: Final = frozenset(str(t) for t in HISTORY_TYPES)


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A record: what the supervisor knows of worker ``index`` now."""

    index: int
    pid: int
    """0 while it is not running."""
    ready: bool
    """Its runtime serves (its control socket answers)."""


def worker_socket(rundir: Path, k: int) -> Path:
    """Worker ``k``'s private control socket."""
    return rundir / f"w{k}.sock"


class CombinedControl:
    """The public control socket of a gateway's supervisor (module docstring).

    Lifecycle: :meth:`listen` (before the workers are forked: a socket that cannot be
    created is a start-up error), :meth:`start` (its thread), :meth:`stop`.
    """

    role: Final = "gateway"

    def __init__(
        self,
        path: Path,
        node_id: str,
        rundir: Path,
        workers: Callable[[], Sequence[WorkerState]],
        *,
        timeout: float = ASK_TIMEOUT_S,
        history: int = HISTORY_SIZE,
    ) -> None:
        """``workers()`` says (from the supervisor's thread, read here) which run."""
        self.server: ControlServer = ControlServer(path, self)
        self._node_id = node_id
        self._rundir = rundir
        self._workers = workers
        self._timeout = timeout
        self._history: deque[Mapping[str, object]] = deque(maxlen=history)
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._followed: dict[int, int] = {}
        """Worker index -> the pid whose stream (and history) was followed last."""

    @property
    def path(self) -> Path:
        return self.server.path

    def listen(self) -> None:
        """Create the public socket now (ControlError naming the path if that fails)."""
        self.server.listen()

    def start(self) -> None:
        """Serve on a thread of its own (until :meth:`stop`)."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)), name="jvpn-control", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)

    def stop(self) -> None:
        """Stop serving and remove the socket (watchers get the last events). Idempotent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(5.0)
        self.server.discard()

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.server.start()
            n = len(self._workers())
            tasks = [asyncio.ensure_future(self._follow(k)) for k in range(n)]
            tasks.append(asyncio.ensure_future(self._publish_statuses()))
        finally:
            ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await self.server.close(CLOSE_FLUSH_S)

    # -- ControlTarget -------------------------------------------------------------------

    async def status(self) -> GatewayStatus:
        states = self._workers()
        answers = await asyncio.gather(*(self._ask(w, Status()) for w in states))
        parts: list[tuple[WorkerState, GatewayStatus | str]] = []
        for state, answer in zip(states, answers, strict=True):
            parts.append((state, _status_of(answer)))
        return merge_status(self._node_id, time.monotonic() - self._started, parts)

    def history(self) -> Sequence[Mapping[str, object]]:
        return tuple(self._history)

    async def command(self, request: Command) -> Result:
        if request.command == "reload_policy":
            return await self._reload(request)
        if request.command == "terminate" and request.session:
            return await self._terminate(request.session)
        return await self._first_answer(request)

    # -- commands ------------------------------------------------------------------------

    async def _reload(self, request: Command) -> Result:
        """Every worker reloads; the detail has a line per worker."""
        states = self._workers()
        answers = await asyncio.gather(*(self._ask(w, request) for w in states))
        lines: list[str] = []
        ok = True
        for state, answer in zip(states, answers, strict=True):
            result = _result_of(answer)
            ok = ok and result.ok
            lines.append(f"worker {state.index}: {result.detail}")
        return Result(ok=ok, detail="\n".join(lines))

    async def _terminate(self, session: str) -> Result:
        """The one live session ``session`` names among every worker's, ended by its worker."""
        status = await self.status()
        live = {s.session_id: s.worker for s in status.sessions if s.state != "TERMINATED"}
        missing = [w for w in status.workers if not w.ok]
        match = one_match(session.lower(), list(live))
        if isinstance(match, Result):
            if missing and not match.ok:
                names = ", ".join(f"worker {w.index} ({w.problem})" for w in missing)
                return Result(ok=False, detail=f"{match.detail}; not asked: {names}")
            return match
        k = live[match]
        state = self._workers()[k if k is not None else 0]
        result = _result_of(await self._ask(state, Command(command="terminate", session=match)))
        return Result(ok=result.ok, detail=f"worker {state.index}: {result.detail}")

    async def _first_answer(self, request: Command) -> Result:
        """A command one worker answers as any would (the client's commands: refused)."""
        problems: list[str] = []
        for state in self._workers():
            answer = await self._ask(state, request)
            if not isinstance(answer, str):
                return _result_of(answer)
            problems.append(f"worker {state.index}: {answer}")
        return Result(ok=False, detail="no worker answered: " + "; ".join(problems))

    # -- asking a worker -----------------------------------------------------------------

    async def _ask(self, state: WorkerState, request: Request) -> Message | str:
        """Worker ``state.index``'s answer to ``request``, or why there is none."""
        if not state.pid:
            return "not running (it is being started again)"
        if not state.ready:
            return f"starting (pid {state.pid})"
        path = worker_socket(self._rundir, state.index)
        try:
            return await asyncio.wait_for(_exchange(path, request), self._timeout)
        except TimeoutError:
            return f"no answer in {self._timeout:g}s (pid {state.pid})"
        except (OSError, ControlError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return f"not answering on its control socket (pid {state.pid})"

    # -- events --------------------------------------------------------------------------

    async def _follow(self, k: int) -> None:
        """Worker ``k``'s event stream, merged into this one's, for as long as this runs."""
        while True:
            state = self._workers()[k]
            if state.pid and state.ready:
                with contextlib.suppress(
                    OSError, ControlError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, TimeoutError,
                ):  # fmt: skip
                    await self._stream(k)
            await asyncio.sleep(FOLLOW_RETRY_S)

    async def _stream(self, k: int) -> None:
        """Follow worker ``k`` until its stream ends; its history only from a process not
        followed before (a restarted worker's), so no event is merged twice."""
        path = worker_socket(self._rundir, k)
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_LINE), self._timeout
        )
        try:
            hello = decode_reply(await asyncio.wait_for(reader.readuntil(b"\n"), self._timeout))
            if not isinstance(hello, Hello):
                return
            writer.write(encode(Watch(history=self._followed.get(k) != hello.pid)))
            await writer.drain()
            self._followed[k] = hello.pid
            while True:
                message = decode_reply(await reader.readuntil(b"\n"))
                if isinstance(message, EventMsg):
                    self._on_event(message.event)
        finally:
            writer.close()

    def _on_event(self, event: Mapping[str, object]) -> None:
        if event.get("event_type") in _HISTORY_NAMES:
            self._history.append(event)
        self.server.publish_event(event)

    async def _publish_statuses(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            if self.server.status_watchers:
                self.server.publish_status(await self.status())


async def _exchange(path: Path, request: Request) -> Message:
    """One request to a worker's control socket and its answer."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    try:
        hello = decode_reply(await reader.readuntil(b"\n"))
        if not isinstance(hello, Hello):
            raise ControlError(f"{path}: no hello")
        writer.write(encode(request))
        await writer.drain()
        return decode_reply(await reader.readuntil(b"\n"))
    finally:
        writer.close()


def _status_of(answer: Message | str) -> GatewayStatus | str:
    if isinstance(answer, str):
        return answer
    if not isinstance(answer, StatusReply):
        return f"refused the status: {_describe(answer)}"
    try:
        return gateway_status(answer.status)
    except ControlError as exc:
        return str(exc)


def _result_of(answer: Message | str) -> Result:
    if isinstance(answer, str):
        return Result(ok=False, detail=answer)
    if isinstance(answer, Result):
        return answer
    return Result(ok=False, detail=_describe(answer))


def _describe(message: Message) -> str:
    return message.error if isinstance(message, Error) else type(message).__name__


# -- merging the workers' statuses ---------------------------------------------------------


def merge_status(
    node_id: str, uptime_s: float, parts: Sequence[tuple[WorkerState, GatewayStatus | str]]
) -> GatewayStatus:
    """One gateway's status from its workers' (a string: why a worker did not answer):
    every session (with its worker), the counters summed, the flags all-of."""
    answered = [(w, s) for w, s in parts if isinstance(s, GatewayStatus)]
    first = answered[0][1] if answered else GatewayStatus(node_id, (), "", 0.0, ())
    return GatewayStatus(
        node_id=node_id,
        listen=first.listen,
        policy_version=", ".join(sorted({s.policy_version for _, s in answered})),
        uptime_s=uptime_s,
        sessions=tuple(
            msgspec.structs.replace(x, worker=w.index) for w, s in answered for x in s.sessions
        ),
        policy_ok=all(s.policy_ok for _, s in answered),
        policy_error=_policy_errors(answered),
        sessions_created=_sum(answered, "sessions_created"),
        sessions_denied=_sum(answered, "sessions_denied"),
        handshakes_refused=_sum(answered, "handshakes_refused"),
        drops=_drops(answered),
        traffic=_traffic(s.traffic for _, s in answered),
        events_dropped=_sum(answered, "events_dropped"),
        store_conflicts=_sum(answered, "store_conflicts"),
        observability_ok=all(s.observability_ok for _, s in answered),
        ciphers=first.ciphers,
        workers=tuple(_worker(node_id, w, s) for w, s in parts),
    )  # fmt: skip


def _drops(answered: Sequence[tuple[WorkerState, GatewayStatus]]) -> tuple[tuple[str, int], ...]:
    drops: dict[str, int] = {}
    for _, s in answered:
        for reason, count in s.drops:
            drops[reason] = drops.get(reason, 0) + count
    return tuple(sorted(drops.items()))


def _policy_errors(answered: Sequence[tuple[WorkerState, GatewayStatus]]) -> str | None:
    errors = [f"worker {w.index}: {s.policy_error}" for w, s in answered if s.policy_error]
    return "; ".join(errors) or None


def _sum(answered: Sequence[tuple[WorkerState, GatewayStatus]], name: str) -> int:
    return sum(int(getattr(s, name)) for _, s in answered)


def _traffic(parts: Iterable[GatewayTraffic]) -> GatewayTraffic:
    total = GatewayTraffic()
    for t in parts:
        total = GatewayTraffic(
            datagrams_in=total.datagrams_in + t.datagrams_in,
            datagrams_out=total.datagrams_out + t.datagrams_out,
            send_failed=total.send_failed + t.send_failed,
            inner_to_clients=total.inner_to_clients + t.inner_to_clients,
            inner_from_clients=total.inner_from_clients + t.inner_from_clients,
        )
    return total


def _worker(node_id: str, w: WorkerState, s: GatewayStatus | str) -> GatewayWorkerStatus:
    if isinstance(s, str):
        return GatewayWorkerStatus(
            index=w.index, node_id=f"{node_id}-w{w.index}", pid=w.pid, ok=False, problem=s
        )
    live = sum(1 for x in s.sessions if x.state != "TERMINATED")
    return GatewayWorkerStatus(index=w.index, node_id=s.node_id, pid=w.pid, ok=True, sessions=live)
