"""bench/failover.py does what bench/README.md and docs/performance.md say it does.

Only the parts that need no root and start nothing: the options and their defaults, the
statistics (median, nearest-rank p95, stall = the worse direction, loss), the ratios
printed for --compare, the per-kill stall/loss arithmetic on known arrival times, the
choice of kill mechanism, and the one-line skip note for a tool that is missing. The
bench itself is never run here (it is a measurement, not a test).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_failover", BENCH / "failover.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_failover"] = module
    spec.loader.exec_module(module)
    return module


fo = _load()
from failover_kit.flows import longest_gap, lost_between  # noqa: E402  (path set by _load)
from failover_kit.kills import LinkDown, NftDrop, TcDrop, busiest  # noqa: E402
from failover_kit.tunnels import Openvpn, WireguardWatchdog  # noqa: E402


def kill(i: int, up: float, down: float, tcp: float, lost: tuple[int, int] = (0, 0)) -> object:
    return fo.KillResult(i, i % 2, up, down, tcp, lost[0], lost[1])


# -- options -------------------------------------------------------------------------------


def test_defaults_are_jvpn_alone_silent_8_kills_every_10_s() -> None:
    args = fo.parse_args([])
    assert (args.mode, args.compare, args.kills) == ("silent", False, 8)
    assert (args.period, args.down) == (10.0, 3.0)
    assert args.kills * args.period <= 100  # the default run stays near 2 minutes


def test_compare_keeps_the_path_dead_longer_than_openvpns_restart_unless_told() -> None:
    args = fo.parse_args(["--compare", "-n", "10"])
    assert (args.compare, args.kills, args.period, args.down) == (True, 10, 12.0, 6.0)
    args = fo.parse_args(["--compare", "--period", "20", "--down", "9"])
    assert (args.period, args.down) == (20.0, 9.0)


def test_mode_linkdown_is_accepted_and_unknown_modes_are_refused() -> None:
    assert fo.parse_args(["--mode", "linkdown"]).mode == "linkdown"
    with pytest.raises(SystemExit):
        fo.parse_args(["--mode", "blackhole"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--comp"],  # abbreviations are refused, like every jvpn program
        ["--period", "5", "--down", "4.5"],  # no time left for the path to come back
        ["-n", "0"],
    ],
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        fo.parse_args(argv)


# -- statistics ----------------------------------------------------------------------------


def test_p95_is_the_nearest_rank_and_the_maximum_for_ten_kills() -> None:
    assert fo.percentile(list(range(1, 21)), 0.95) == 19  # element round(0.95 * 19) = 18
    ten = [500, 300, 900, 400, 450, 600, 350, 700, 800, 1000]
    assert fo.percentile(ten, 0.95) == 1000
    assert fo.percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        fo.percentile([], 0.95)


def test_stats_use_the_worse_direction_and_add_up_the_loss() -> None:
    kills = [
        kill(1, up=300, down=500, tcp=700, lost=(10, 20)),
        kill(2, up=900, down=100, tcp=400, lost=(1, 2)),
        kill(3, up=200, down=250, tcp=600, lost=(0, 3)),
    ]
    s = fo.stats(kills)
    assert s.kills == 3
    assert s.stall_median == 500  # of 500, 900, 250
    assert s.stall_p95 == 900
    assert s.tcp_median == 600
    assert s.lost == 36
    assert fo.stats([]) is None


def test_ratios_are_the_anchor_over_jvpn() -> None:
    jvpn = fo.Stats(kills=10, stall_median=500, stall_p95=900, tcp_median=700, lost=1000)
    anchor = fo.Stats(kills=10, stall_median=1500, stall_p95=1800, tcp_median=3500, lost=0)
    got = fo.ratios(jvpn, anchor)
    assert got == {"stall median": 3.0, "p95": 2.0, "TCP stall median": 5.0, "lost": 0.0}
    assert fo.format_ratio(3.0) == "3.0x"
    assert fo.ratio(10, 0) is None and fo.format_ratio(None) == "-"


def test_the_comparison_prints_every_tool_and_the_ratio_lines() -> None:
    jvpn = fo.ToolRun("jvpn", kills=[kill(1, 400, 500, 600), kill(2, 500, 400, 800)])
    wg = fo.ToolRun("wireguard-go+watchdog", kills=[kill(1, 1500, 1400, 1800)] * 2)
    ovpn = fo.ToolRun("openvpn", skipped="openvpn: skipped: openvpn not installed (...)")
    lines = fo.comparison_lines([jvpn, wg, ovpn], "silent")
    text = "\n".join(lines)
    assert "wireguard-go+watchdog / jvpn: stall median 3.0x, p95 3.0x" in text
    assert "TCP stall median 2.6x" in text  # 1800 / median(600, 800)
    assert "openvpn: skipped: openvpn not installed" in text
    assert "openvpn / jvpn" not in text  # no ratio for a tool that did not run


# -- per-kill arithmetic on known arrival times --------------------------------------------


def test_stall_is_the_longest_gap_from_the_last_delivery_before_the_kill() -> None:
    times = [0.0, 0.5, 1.0, 1.9, 2.0, 2.1, 2.2]
    assert longest_gap(times, 1.1, 2.3) == pytest.approx(0.9)  # 1.0 -> 1.9
    assert longest_gap(times, 0.4, 0.6) == pytest.approx(0.5)  # 0.0 -> 0.5
    assert longest_gap([0.0, 1.0], 1.5, 4.0) == pytest.approx(3.0)  # never came back


def test_loss_counts_sequence_numbers_missing_around_the_kill() -> None:
    seqs = [1, 2, 3, 7, 8, 10]
    times = [0.1, 0.2, 0.3, 1.0, 1.1, 1.2]
    assert lost_between(seqs, times, 0.5, 2.0) == 4  # 4, 5, 6, 9 after the last before (3)
    assert lost_between(seqs, times, 5.0, 6.0) == 0


def test_the_active_path_is_the_one_whose_counters_grew_most() -> None:
    assert busiest([100, 100], [105, 400]) == 1
    assert busiest([100, 100], [100, 100], default=1) == 1  # nothing moved: keep the last


# -- tools and kill mechanism --------------------------------------------------------------


def test_silent_uses_nftables_then_tc_and_linkdown_the_link() -> None:
    assert fo.killer_for("silent", lambda c: True) is NftDrop
    assert fo.killer_for("silent", lambda c: c == "tc") is TcDrop
    assert fo.killer_for("silent", lambda c: False) is None
    assert fo.killer_for("linkdown", lambda c: False) is LinkDown


def test_a_missing_tool_is_skipped_with_one_line_naming_the_package() -> None:
    requires = WireguardWatchdog.requires
    absent = fo.missing(requires, lambda c: c == "wg")
    assert absent == ["wireguard-go"]
    note = fo.skip_note(WireguardWatchdog.name, requires, absent)
    assert note == (
        "wireguard-go+watchdog: skipped: wireguard-go not installed (apt-get install wireguard-go)"
    )
    assert "\n" not in note


def test_prepare_installs_missing_packages_once_and_skips_what_is_still_missing() -> None:
    asked: list[list[str]] = []

    def installer(packages: object) -> str:
        asked.append(list(packages))  # type: ignore[call-overload]
        return "apt-get install failed"

    args = fo.parse_args(["--compare"])
    killer, runnable, notes = fo.prepare(args, lambda c: c in {"tc", "wg", "wireguard-go"},
                                         installer)  # fmt: skip
    assert asked == [["openvpn", "nftables"]]
    assert killer is TcDrop
    assert runnable == [WireguardWatchdog]
    assert "openvpn: skipped: openvpn not installed (apt-get install openvpn)" in notes

    asked.clear()
    args = fo.parse_args(["--compare", "--no-install"])
    _, runnable, notes = fo.prepare(args, lambda c: c != "openvpn", installer)
    assert asked == [] and runnable == [WireguardWatchdog]
    assert any(n.startswith("openvpn: skipped:") for n in notes)
    assert Openvpn.requires == {"openvpn": "openvpn"}


def test_jvpn_alone_needs_no_anchor() -> None:
    _, runnable, notes = fo.prepare(fo.parse_args(["--mode", "linkdown"]), lambda c: False,
                                    lambda p: pytest.fail("nothing to install"))  # fmt: skip
    assert runnable == [] and notes == []


def test_a_tool_that_does_not_come_up_is_skipped_in_one_line_and_cleaned_up() -> None:
    from failover_kit.tunnels import ToolError

    class Broken:
        name = "openvpn"
        stopped = False

        def describe(self) -> str:
            return "OpenVPN as the bench runs it"

        def start(self) -> None:
            raise ToolError("openvpn exited: Options error: bad option\nUse --help for more")

        def stop(self) -> None:
            Broken.stopped = True

    run = fo.measure(Broken(), killer=None, args=fo.parse_args(["--compare"]))
    assert (
        run.skipped
        == "openvpn: skipped: did not come up: openvpn exited: Options error: bad option"
    )
    assert run.kills == [] and Broken.stopped
    assert run.skipped in fo.comparison_lines([run], "silent")[-1]
