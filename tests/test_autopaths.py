"""Which interfaces carry paths under ``paths = "auto"`` (issue 10 item 4): the pure rules
of :func:`tunnel.client.autopaths.candidates` and the follower's numbering, without a
kernel (the real one: tests/test_autopaths_netns.py)."""

from __future__ import annotations

from tunnel.client.autopaths import Candidate, Endpoint, Interface, PathFollower, candidates
from tunnel.client.config import MAX_PATHS, AutoPaths, ClientConfig
from tunnel.core.events import Reason
from tunnel.core.policy import POLICY_DEFAULT

V4 = Endpoint("vpn.example.net", 51820, "198.51.100.1")
V6 = Endpoint("vpn.example.net", 51820, "2001:db8::1")
AUTO = AutoPaths(gateways=(("vpn.example.net", 51820),))


def names(found: list[Candidate]) -> list[tuple[str, str]]:
    return [(c.ifname, c.address) for c in found]


def test_each_usable_address_pairs_with_each_endpoint_of_its_family() -> None:
    found = candidates(
        [
            Interface("eth0", "192.0.2.7", True),
            Interface("eth0", "2001:db8:1::7", True),
            Interface("eth0", "fe80::1", True),  # link-local
            Interface("wlan0", "203.0.113.9", False),  # down or no carrier
            Interface("lo", "127.0.0.1", True, loopback=True),
            Interface("eth1", "2001:db8:2::7", True, flags=0x40),  # tentative (DAD)
            Interface("eth1", "224.0.0.5", True),  # multicast
        ],
        AUTO,
        [V4, V6],
    )
    assert [(c.ifname, c.address, c.gateway) for c in found] == [
        ("eth0", "192.0.2.7", ("vpn.example.net", 51820)),
        ("eth0", "2001:db8:1::7", ("vpn.example.net", 51820)),
    ]
    assert found[0].label == "eth0 192.0.2.7 (vpn.example.net:51820)"
    path = found[0].path(4)
    assert (path.path_id, path.bind, path.device, path.gateway) == (
        4, ("192.0.2.7", 0), "eth0", ("vpn.example.net", 51820),
    )  # fmt: skip


def test_include_exclude_prefer_and_loopback_only_when_named() -> None:
    interfaces = [
        Interface("wlan0", "192.0.2.2", True),
        Interface("eth0", "192.0.2.1", True),
        Interface("docker0", "172.17.0.1", True),
        Interface("wwan0", "192.0.2.3", True),
        Interface("lo", "127.0.0.1", True, loopback=True),
    ]
    auto = AutoPaths(AUTO.gateways, exclude=("docker*",), prefer=("ww*", "wl*"))
    assert names(candidates(interfaces, auto, [V4])) == [
        ("wwan0", "192.0.2.3"), ("wlan0", "192.0.2.2"), ("eth0", "192.0.2.1"),
    ]  # fmt: skip
    named = AutoPaths(AUTO.gateways, include=("lo", "eth*"))
    assert names(candidates(interfaces, named, [V4])) == [
        ("eth0", "192.0.2.1"), ("lo", "127.0.0.1"),
    ]  # fmt: skip
    skip_tun = candidates([Interface("jvpn0", "10.66.0.2", True)], AUTO, [V4], lambda n: True)
    assert skip_tun == []


class Follower:
    """A PathFollower with the kernel replaced: ``follow(interfaces)``."""

    def __init__(self, config: ClientConfig) -> None:
        self.attached: list[int] = []
        self.detached: list[tuple[int, str]] = []
        self.reports: list[tuple[Reason, str]] = []
        self.follower = PathFollower(
            config,
            attach=lambda p, remote: self.attached.append(p.path_id) or True,
            detach=lambda pid, detail: self.detached.append((pid, detail)),
            report=lambda reason, detail: self.reports.append((reason, detail)),
            skip=lambda name: False,
            endpoints=[V4],
        )

    def follow(self, interfaces: list[Interface]) -> None:
        self.follower.reconcile(interfaces)


def _config(*interfaces: Interface) -> ClientConfig:
    from dataclasses import replace

    from tunnel.core.handshake import generate_keypair

    private, public = generate_keypair()
    found = candidates(interfaces, AUTO, [V4])
    base = ClientConfig(
        private_key=private, gateway_public_key=public, paths=(), auto=AUTO,
        policy=replace(POLICY_DEFAULT, max_candidate_count=MAX_PATHS),
    )  # fmt: skip
    return replace(base, paths=tuple(c.path(n) for n, c in enumerate(found, 1)))


def test_numbers_are_kept_for_life_and_never_given_to_another() -> None:
    eth0 = Interface("eth0", "192.0.2.1", True)
    wlan0 = Interface("wlan0", "192.0.2.2", True)
    f = Follower(_config(eth0, wlan0))
    f.follow([wlan0])  # eth0 went away
    assert f.detached[0][0] == 1 and "eth0" in f.detached[0][1]
    usb0 = Interface("usb0", "192.0.2.3", True)
    f.follow([wlan0, usb0])
    assert f.attached == [3]  # not 1: that one was eth0's
    f.follow([eth0, wlan0, usb0])
    assert f.attached == [3, 1]  # eth0 is back under its own number

    # eth1..eth8 (and only they) now: six take the free numbers 4-9, two find none left
    more = [Interface(f"eth{n}", f"192.0.2.{10 + n}", True) for n in range(1, 9)]
    f.follow(more)
    assert f.attached == [3, 1, 4, 5, 6, 7, 8, 9]
    assert sorted(f.follower.current.values()) == [4, 5, 6, 7, 8, 9]
    told = [d for r, d in f.reports if r is Reason.NO_CANDIDATE_TRANSPORTS]
    assert [d.split(":")[0] for d in told] == [
        "no path number left for eth7 192.0.2.17 (vpn.example.net",
        "no path number left for eth8 192.0.2.18 (vpn.example.net",
    ]
    f.follow(more)  # said once each
    assert len([r for r, _ in f.reports if r is Reason.NO_CANDIDATE_TRANSPORTS]) == 2


def test_no_more_paths_at_once_than_the_policy_allows() -> None:
    eth0 = Interface("eth0", "192.0.2.1", True)
    config = _config(eth0)
    from dataclasses import replace

    f = Follower(replace(config, policy=replace(config.policy, max_candidate_count=2)))
    wlan0, usb0 = Interface("wlan0", "192.0.2.2", True), Interface("usb0", "192.0.2.3", True)
    f.follow([eth0, wlan0, usb0])
    assert f.attached == [2] and len(f.follower.current) == 2  # usb0 waits
    f.follow([wlan0, usb0])  # eth0 leaves: usb0 takes its turn
    assert f.attached == [2, 3]
