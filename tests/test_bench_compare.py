"""bench/compare.py does what its docstring, bench/README.md and docs/performance.md say.

Only the parts that need no root and start nothing: the options, the columns (stream
counts x both directions), the median of the repetitions (failed runs left out), the
ratios jvpn / wireguard-go and jvpn / OpenVPN AES-256-GCM per column, the CPU seconds per
process, the printed tables, what is installed or skipped, the parsing of one iperf3
result, the CPU model, and that cleanup is not cut short by a signal. The bench itself is
never run here (it is a measurement, not a test).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module
    spec.loader.exec_module(module)
    return module


cmp = _load()
from failover_kit.tunnels import Jvpn, OpenvpnChacha, OpenvpnTls, Wireguard  # noqa: E402

ALL = ["bare", "jvpn", "wireguard-go", "openvpn-aes", "openvpn-chacha"]
C1, R1, C4, R4 = "1 stream c->g", "1 stream g->c", "4 streams c->g", "4 streams g->c"


def sample(tunnel: str, rep: int, column: str, mbit: float | None, **cpu: float) -> Any:
    return cmp.Sample(tunnel, rep, column, mbit, 0, dict(cpu), "" if mbit else "failed")


# -- options -------------------------------------------------------------------------------


def test_defaults_are_every_tunnel_one_and_four_streams_three_reps_of_10_s() -> None:
    args = cmp.parse_args([])
    assert (args.duration, args.reps, args.streams) == (10, 3, [1, 4])
    assert args.only == ALL
    assert args.json is None and not args.no_install


def test_only_picks_tunnels_in_run_order_and_refuses_unknown_ones() -> None:
    assert cmp.parse_args(["--only", "wireguard-go,jvpn"]).only == ["jvpn", "wireguard-go"]
    assert cmp.parse_args(["--only", "openvpn-chacha"]).only == ["openvpn-chacha"]
    with pytest.raises(SystemExit):
        cmp.parse_args(["--only", "jvpn,tailscale"])


def test_streams_are_positive_counts_each_once() -> None:
    assert cmp.parse_args(["--streams", "4,1,4"]).streams == [4, 1]
    assert cmp.parse_args(["--streams", "2"]).streams == [2]


@pytest.mark.parametrize(
    "argv",
    [
        ["--streams", "0"],
        ["--streams", "one"],
        ["--streams", ","],
        ["--reps", "0"],
        ["--duration", "0"],
        ["--duration", "2.5"],  # iperf3 -t takes whole seconds
        ["--dur", "3"],  # abbreviations are refused, like every jvpn program
    ],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cmp.parse_args(argv)


def test_the_json_option_takes_a_file() -> None:
    assert cmp.parse_args(["--json", "out.json"]).json == Path("out.json")


# -- columns and arithmetic ----------------------------------------------------------------


def test_every_stream_count_runs_in_both_directions() -> None:
    cols = cmp.columns([1, 4])
    assert [c.label for c in cols] == [C1, R1, C4, R4]
    assert [(c.streams, c.reverse) for c in cols] == [(1, False), (1, True), (4, False), (4, True)]


def test_median_leaves_out_failed_runs() -> None:
    assert cmp.median([810.0, 790.0, 800.0]) == 800.0
    assert cmp.median([810.0, None, 790.0]) == 800.0  # two runs left: their mean
    assert cmp.median([None, None]) is None
    assert cmp.median([]) is None


def test_ratios_are_jvpn_over_each_anchor_per_column() -> None:
    # the table: jvpn 795 / 817, wireguard-go 684 / 669, OpenVPN AES-GCM 882 / 896
    samples = []
    for rep, (j, w, o) in enumerate([(795, 684, 882), (700, 700, 900), (900, 600, 870)], 1):
        samples += [sample("jvpn", rep, C1, j), sample("wireguard-go", rep, C1, w)]
        samples += [sample("openvpn-aes", rep, C1, o)]
    samples += [sample("jvpn", 1, R1, 817.0), sample("wireguard-go", 1, R1, 669.0)]
    samples += [sample("openvpn-aes", 1, R1, None)]  # failed: no ratio for that column
    tunnels = ["jvpn", "wireguard-go", "openvpn-aes"]
    mbit = cmp.median_mbit(samples, tunnels, [C1, R1])
    assert mbit["jvpn"] == {C1: 795, R1: 817}
    assert mbit["wireguard-go"] == {C1: 684, R1: 669}
    assert mbit["openvpn-aes"] == {C1: 882, R1: None}
    got = cmp.ratios(mbit, [C1, R1])
    assert set(got) == {"jvpn/wireguard-go", "jvpn/openvpn-aes"}
    assert got["jvpn/wireguard-go"][C1] == pytest.approx(795 / 684)  # 1.16x
    assert got["jvpn/wireguard-go"][R1] == pytest.approx(817 / 669)  # 1.22x
    assert got["jvpn/openvpn-aes"] == {C1: pytest.approx(795 / 882), R1: None}


def test_no_ratio_without_jvpn_or_without_the_anchor() -> None:
    assert cmp.ratios({"wireguard-go": {C1: 600.0}}, [C1]) == {}
    only_wg = cmp.ratios({"jvpn": {C1: 600.0}, "wireguard-go": {C1: 0.0}}, [C1])
    assert only_wg == {"jvpn/wireguard-go": {C1: None}}  # an anchor at 0: no ratio


def test_cpu_is_the_median_per_process_of_the_runs_that_measured() -> None:
    samples = [
        sample("jvpn", 1, C1, 800.0, gateway=9.0, client=6.0),
        sample("jvpn", 2, C1, 780.0, gateway=9.6, client=6.4),
        sample("jvpn", 3, C1, 820.0, gateway=9.2, client=5.0),
        sample("jvpn", 4, C1, None, gateway=0.1, client=0.1),  # failed: not counted
        sample("bare", 1, C1, 20000.0),  # no tunnel process
    ]
    cpu = cmp.median_cpu(samples, ["jvpn", "bare"], [C1])
    assert cpu["jvpn"][C1] == {"gateway": 9.2, "client": 6.0}
    assert cpu["bare"][C1] == {}


def test_cells_with_fewer_runs_than_repetitions_are_named() -> None:
    samples = [sample("jvpn", r, C1, 800.0) for r in (1, 2, 3)]
    samples += [sample("wireguard-go", 1, C1, 600.0), sample("wireguard-go", 2, C1, None)]
    assert cmp.short_counts(samples, 3) == ["wireguard-go 1 stream c->g: 1 of 3"]


# -- printed tables ------------------------------------------------------------------------


def test_the_table_has_every_tunnel_the_ratio_rows_and_the_cpu_per_process() -> None:
    samples = []
    for rep in (1, 2, 3):
        samples += [
            sample("bare", rep, C1, 20000.0),
            sample("jvpn", rep, C1, 1600.0, gateway=9.0, client=6.0),
            sample("wireguard-go", rep, C1, 800.0, gateway=8.0, client=7.5),
            sample("openvpn-aes", rep, C1, 1000.0, gateway=5.0, client=5.0),
        ]
    tunnels = ["bare", "jvpn", "wireguard-go", "openvpn-aes"]
    mbit = cmp.median_mbit(samples, tunnels, [C1])
    cpu = cmp.median_cpu(samples, tunnels, [C1])
    skipped = {"openvpn-chacha": "not measured (see the notes)"}
    lines = cmp.table_lines(mbit, cpu, [C1], 3, skipped)
    cpu_at = next(i for i, line in enumerate(lines) if line.startswith("CPU s gw/cl"))
    rows = {line.split("  ")[0].strip(): line for line in lines[:cpu_at] if line.strip()}
    assert lines[0].startswith("Mbit/s, median of 3") and C1 in lines[0]
    assert rows["bare veth (no tunnel)"].split()[-1] == "20000"
    assert rows["jvpn"].split()[-1] == "1600"
    assert rows["jvpn / wireguard-go"].split()[-1] == "2.00x"
    assert rows["jvpn / OpenVPN AES-256-GCM"].split()[-1] == "1.60x"
    assert "not measured" in rows["OpenVPN ChaCha20-Poly1305"]
    cpu_rows = {line.split("  ")[0].strip(): line for line in lines[cpu_at:] if line.strip()}
    assert cpu_rows["jvpn"].split()[-1] == "9.00/6.00"
    assert cpu_rows["wireguard-go"].split()[-1] == "8.00/7.50"
    assert cpu_rows["bare veth (no tunnel)"].split()[-1] == "-"


def test_a_run_that_failed_shows_a_dash_and_its_progress_line_says_why() -> None:
    failed = cmp.Sample("wireguard-go", 1, C1, None, None, {}, "iperf3: connection refused")
    mbit = cmp.median_mbit([failed, sample("jvpn", 1, C1, 900.0)], ["jvpn", "wireguard-go"], [C1])
    lines = cmp.table_lines(mbit, {}, [C1], 1)
    assert next(ln for ln in lines if ln.startswith("wireguard-go ")).split()[-1] == "-"
    assert next(ln for ln in lines if ln.startswith("jvpn / wireguard-go")).split()[-1] == "-"
    assert "failed: iperf3: connection refused" in cmp.sample_line(failed)


# -- one run's result ----------------------------------------------------------------------


class FakeTool:
    name = "jvpn"

    def __init__(self, alive: bool = True) -> None:
        self._alive = alive

    def pids(self) -> dict[str, int]:
        return {"gateway": os.getpid(), "client": os.getpid()}

    def alive(self) -> bool:
        return self._alive


class FakeIperf:
    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        self.asked: list[tuple[str, int, Any]] = []

    def run(self, host: str, seconds: int, col: Any) -> dict[str, Any]:
        self.asked.append((host, seconds, col))
        return self.result


def test_a_run_reads_received_mbit_retransmits_and_each_process_cpu() -> None:
    result = {
        "end": {
            "sum_received": {"bits_per_second": 812_500_000.0},
            "sum_sent": {"retransmits": 42},
        }
    }
    iperf3 = FakeIperf(result)
    col = cmp.Column(4, True)
    got = cmp.measure(FakeTool(), iperf3, col, 3, rep=2)  # type: ignore[arg-type]
    assert iperf3.asked == [("10.66.0.1", 3, col)]  # the gateway's inner address
    assert (got.tunnel, got.rep, got.column) == ("jvpn", 2, "4 streams g->c")
    assert got.mbit == pytest.approx(812.5) and got.retransmits == 42
    assert set(got.cpu_s) == {"gateway", "client"}
    assert all(v >= 0 for v in got.cpu_s.values()) and got.error == ""
    assert json.loads(json.dumps(dataclasses.asdict(got)))["mbit"] == pytest.approx(812.5)


def test_a_failed_run_keeps_iperfs_error_and_notes_a_dead_tunnel() -> None:
    got = cmp.measure(
        FakeTool(alive=False),  # type: ignore[arg-type]
        FakeIperf({"error": "unable to connect to server"}),  # type: ignore[arg-type]
        cmp.Column(1, False),
        3,
        rep=1,
    )
    assert got.mbit is None
    assert "unable to connect to server" in got.error
    assert "tunnel process exited" in got.error


# -- what runs ------------------------------------------------------------------------------


def test_missing_anchors_are_installed_once_and_skipped_in_one_line_if_still_missing() -> None:
    asked: list[list[str]] = []

    def installer(packages: Any) -> str:
        asked.append(list(packages))
        return "apt-get install failed"

    present = {"iperf3", "wg"}
    runnable, notes = cmp.prepare(ALL, False, lambda c: c in present, installer)
    assert asked == [["wireguard-go", "openvpn"]]
    assert runnable == ["bare", "jvpn"]
    assert "wireguard-go: skipped: wireguard-go not installed (apt-get install wireguard-go)" in (
        notes
    )
    assert "openvpn-aes: skipped: openvpn not installed (apt-get install openvpn)" in notes
    assert "openvpn-chacha: skipped: openvpn not installed (apt-get install openvpn)" in notes
    assert all("\n" not in n for n in notes)


def test_no_install_never_installs_and_without_iperf3_nothing_runs() -> None:
    def installer(packages: Any) -> str:
        raise AssertionError("--no-install must not install")

    runnable, notes = cmp.prepare(ALL, True, lambda c: c != "iperf3", installer)
    assert runnable == []
    assert notes == ["compare: skipped: iperf3 not installed (apt-get install iperf3)"]
    runnable, notes = cmp.prepare(["bare", "jvpn"], True, lambda c: True, installer)
    assert (runnable, notes) == (["bare", "jvpn"], [])


def test_the_anchors_are_the_plain_tunnels_named_in_the_table() -> None:
    assert cmp.TUNNELS["wireguard-go"][1] is Wireguard
    assert (OpenvpnTls.cipher, OpenvpnChacha.cipher) == ("AES-256-GCM", "CHACHA20-POLY1305")
    assert cmp.TUNNELS["openvpn-aes"][1] is OpenvpnTls
    assert cmp.TUNNELS["openvpn-chacha"][1] is OpenvpnChacha
    assert cmp.TUNNELS["jvpn"][1] is Jvpn


def test_the_data_cipher_is_read_from_what_the_tunnel_says() -> None:
    from throughput import LineLog

    ovpn = OpenvpnTls.__new__(OpenvpnTls)
    ovpn.client_log = LineLog()
    assert ovpn.data_cipher() is None
    ovpn.client_log.lines.append(
        (1.0, "2026-12-07 Outgoing Data Channel: Cipher 'AES-256-GCM' initialized with 256 bit key")
    )
    assert ovpn.data_cipher() == "AES-256-GCM"

    class Rig:
        def __init__(self, events: list[dict[str, Any]]) -> None:
            self._events = events

        def events(self) -> list[tuple[float, dict[str, Any]]]:
            return [(0.0, e) for e in self._events]

    jvpn = Jvpn.__new__(Jvpn)
    jvpn.rig = Rig([{"event_type": "SESSION_CREATED"}])  # type: ignore[assignment]
    assert jvpn.data_cipher() is None  # not reported: the bench says so, nothing fails
    jvpn.rig = Rig([{"event_type": "SESSION_CREATED", "data_cipher": "aes-256-gcm"}])  # type: ignore[assignment]
    assert jvpn.data_cipher() == "aes-256-gcm"


def test_the_cpu_model_comes_from_proc_cpuinfo(tmp_path: Path) -> None:
    from throughput import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: X\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
    )
    assert cpu_model(str(info)) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert cpu_model(str(tmp_path / "absent")) == "?"


def test_a_signal_during_cleanup_waits_until_the_cleanup_is_done() -> None:
    done = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), cmp.shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("cleanup finished")
    assert done == ["cleanup finished"]
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
