"""The data cipher is negotiated in the handshake (tunnel/core/ciphers.py, docs/wire-format.md
"Data cipher"): AES-256-GCM or ChaCha20-Poly1305, the client's order among what the gateway
allows, ChaCha20-Poly1305 for a peer without the extension, a clear refusal on both sides
when there is none in common; rekeys and reattaches keep the cipher.

Core level: a real client and gateway over memory links with a fake clock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import CLIENT_INNER, GATEWAY_INNER, ipv4_packet, make_policy, of_type

from tunnel.client.config import ClientConfig, parse_client_config
from tunnel.client.config import ConfigError as ClientConfigError
from tunnel.core.aead import AES_GCM_MAX_DATAGRAMS, SessionCipher, TrafficKeys
from tunnel.core.ciphers import (
    ALL_CIPHERS,
    CipherNameError,
    DataCipher,
    accepted_choice,
    choose,
    default_offer,
    parse_cipher_names,
)
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_DATA, MSG_HANDSHAKE_INIT, PROTOCOL_VERSION
from tunnel.core.cookie import CookieJar
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, Reason, reason_to_wire
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import Initiator, Responder, generate_keypair
from tunnel.core.initiator import Accepted, HandshakeInitiator
from tunnel.core.key_schedule import KeySchedule
from tunnel.core.session import State
from tunnel.core.wire import (
    InitPayload,
    RespPayload,
    pack_handshake,
    parse_header,
    split_handshake,
)
from tunnel.gateway.config import ConfigError as GatewayConfigError
from tunnel.gateway.config import GatewayConfig, load_gateway_config
from tunnel.io.cpu import has_aes_flag
from tunnel.io.memory import MemoryLink, Simulation
from tunnel.keys import write_private_key, write_public_key

AES = DataCipher.AES_256_GCM
CHACHA = DataCipher.CHACHA20_POLY1305


def simulation(
    client_ciphers: Sequence[DataCipher], gateway_ciphers: Sequence[DataCipher], **policy: int
) -> Simulation:
    """A client offering ``client_ciphers`` and a gateway allowing ``gateway_ciphers``,
    handshake started."""
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    pol = make_policy(**policy)
    client = ClientSession(
        static_private=cl_priv, gateway_public=gw_pub, paths=[PathSpec(1, "p1"), PathSpec(2, "p2")],
        policy=pol, now=0.0, rng=random.Random(2), ciphers=client_ciphers,
    )  # fmt: skip
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[ClientEntry("alice", cl_pub, CLIENT_INNER)],
        policy=pol, now=0.0, urandom=random.Random(3).randbytes, rng=random.Random(4),
        ciphers=gateway_ciphers,
    )  # fmt: skip
    rng = random.Random(1)
    sim = Simulation(client, gateway, [MemoryLink(i, rng=rng) for i in (1, 2)])
    sim.start()
    return sim


def round_trip(sim: Simulation, n: int = 5) -> None:
    """``n`` inner packets each way arrive intact."""
    for i in range(n):
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, b"up%d" % i, ident=i))
        sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER, b"dn%d" % i, ident=i))
    before_up, before_down = len(sim.gateway_tun.from_tunnel), len(sim.client_tun.from_tunnel)
    sim.advance(0.5)
    up = list(sim.gateway_tun.from_tunnel)[before_up:]
    down = list(sim.client_tun.from_tunnel)[before_down:]
    assert sorted(p[-3:] for p in up) == sorted(b"up%d" % i for i in range(n))
    assert sorted(p[-3:] for p in down) == sorted(b"dn%d" % i for i in range(n))


def created(events: Sequence[object]) -> list[str]:
    return [e.cipher for e in of_type(list(events), EventType.SESSION_CREATED)]  # type: ignore[attr-defined]


def gateway_session_cipher(sim: Simulation) -> DataCipher:
    (s,) = sim.gateway.sessions.values()
    return s.cipher.suite


# -- the rule ---------------------------------------------------------------------------------


def test_the_clients_order_wins_among_the_ciphers_the_gateway_allows() -> None:
    assert choose([AES, CHACHA], ALL_CIPHERS) is AES
    assert choose([CHACHA, AES], ALL_CIPHERS) is CHACHA
    assert choose([AES, CHACHA], [CHACHA]) is CHACHA
    assert choose([AES], [CHACHA]) is None
    assert choose([], [CHACHA]) is CHACHA  # a client without the extension
    assert choose([], [AES]) is None
    assert choose([200, 7, CHACHA], ALL_CIPHERS) is CHACHA  # codes this build does not know


def test_the_client_accepts_exactly_one_cipher_of_its_offer() -> None:
    assert accepted_choice([AES], [AES, CHACHA]) is AES
    assert accepted_choice([AES], [CHACHA]) is None
    assert accepted_choice([], [CHACHA, AES]) is CHACHA  # a gateway without the extension
    assert accepted_choice([], [AES]) is None
    assert accepted_choice([AES, CHACHA], [AES, CHACHA]) is None


def test_the_default_order_follows_the_cpus_aes_instructions() -> None:
    assert default_offer(True) == (AES, CHACHA)
    assert default_offer(False) == (CHACHA, AES)
    assert has_aes_flag("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert has_aes_flag("Features\t: fp asimd evtstrm aes pmull sha1\n")
    assert not has_aes_flag("flags\t\t: fpu sse2 avx2 vaes_not_really\n")


def test_configured_names_are_checked() -> None:
    assert parse_cipher_names(["chacha20-poly1305"]) == (CHACHA,)
    assert parse_cipher_names(["aes-256-gcm", "chacha20-poly1305"]) == (AES, CHACHA)
    for bad in ([], ["aes-128-gcm"], ["aes-256-gcm", "aes-256-gcm"], ["AES-256-GCM"]):
        with pytest.raises(CipherNameError):
            parse_cipher_names(bad)


# -- the session cipher -------------------------------------------------------------------------


def pair(suite: DataCipher) -> tuple[SessionCipher, SessionCipher]:
    a, b = bytes(range(32)), bytes(range(32, 64))
    return (
        SessionCipher(TrafficKeys(send=a, recv=b), suite=suite),
        SessionCipher(TrafficKeys(send=b, recv=a), suite=suite),
    )


@pytest.mark.parametrize(("suite", "aead"), [(AES, AESGCM), (CHACHA, ChaCha20Poly1305)])
def test_each_cipher_seals_as_the_wire_format_says(suite: DataCipher, aead: type) -> None:
    """docs/wire-format.md: nonce = 4 zero bytes + counter (u64 LE), AD = the 16-byte header."""
    tx, rx = pair(suite)
    tx.seal(MSG_DATA, 77, b"first")
    datagram = tx.seal(MSG_DATA, 77, b"hello")
    header, nonce = datagram[:16], struct.pack("<4xQ", 1)
    assert datagram[16:] == aead(bytes(range(32))).encrypt(nonce, b"hello", header)
    assert rx.open(datagram, 0.0) == b"hello"


def test_the_two_ciphers_do_not_open_each_others_datagrams() -> None:
    (aes_tx, aes_rx), (chacha_tx, chacha_rx) = pair(AES), pair(CHACHA)
    assert chacha_rx.open(aes_tx.seal(MSG_DATA, 1, b"x" * 100), 0.0) is Drop.BAD_TAG
    assert aes_rx.open(chacha_tx.seal(MSG_DATA, 1, b"x" * 100), 0.0) is Drop.BAD_TAG


@pytest.mark.parametrize("suite", list(DataCipher))
def test_a_rekey_keeps_the_cipher(suite: DataCipher) -> None:
    tx, rx = pair(suite)
    assert tx.rekey(1.0)
    datagram = tx.seal(MSG_DATA, 1, b"after the rekey")
    assert rx.open(datagram, 1.0) == b"after the rekey"
    assert (tx.phase, rx.phase) == (1, 1)
    assert (tx.suite, rx.suite) == (suite, suite)


def test_an_aes_key_is_rotated_when_worn_out_in_either_direction_whatever_its_age() -> None:
    """wire-format.md, "Data cipher": AES_GCM_MAX_DATAGRAMS per key generation, counted on
    what the client sealed and on what it opened; ChaCha20's bound is far higher."""
    for suite, worn in ((AES, True), (CHACHA, False)):
        schedule = KeySchedule()
        cipher = schedule.install(
            TrafficKeys(send=bytes(32), recv=bytes(range(32))), 8192, 0.0, suite
        )
        assert schedule.on_timer(1.0, 120) is None
        cipher.send_counter = AES_GCM_MAX_DATAGRAMS
        assert schedule.on_timer(2.0, 120) == (1 if worn else None), suite
    peer, schedule = (
        SessionCipher(TrafficKeys(send=bytes(range(32)), recv=bytes(32)), suite=AES),
        KeySchedule(),
    )
    cipher = schedule.install(TrafficKeys(send=bytes(32), recv=bytes(range(32))), 8192, 0.0, AES)
    peer.send_counter = AES_GCM_MAX_DATAGRAMS - 1
    assert cipher.open(peer.seal(MSG_DATA, 1, b"the last one"), 1.0) == b"the last one"
    assert schedule.on_timer(2.0, 120) == 1  # the gateway's direction wore it out
    assert cipher.suite is AES and cipher.send_counter == 0


# -- whole handshakes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "gateway", "expected"),
    [
        ((AES, CHACHA), (AES, CHACHA), AES),
        ((CHACHA, AES), (AES, CHACHA), CHACHA),  # the client prefers ChaCha20
        ((CHACHA,), (AES, CHACHA), CHACHA),  # the client forbids AES
        ((AES, CHACHA), (CHACHA,), CHACHA),  # the gateway's configuration forbids AES
        ((AES,), (AES,), AES),
    ],
)
def test_both_sides_agree_on_the_cipher_and_say_so(
    client: tuple[DataCipher, ...], gateway: tuple[DataCipher, ...], expected: DataCipher
) -> None:
    sim = simulation(client, gateway)
    sim.advance(1.0)
    assert sim.client.state is State.ATTACHED
    assert created(sim.client_events) == [expected.label]
    assert created(sim.gateway_events) == [expected.label]
    assert sim.client.snapshot(sim.now).cipher == expected.label
    assert [v.cipher for v in sim.gateway.session_views(sim.now)] == [expected.label]
    assert gateway_session_cipher(sim) is expected
    round_trip(sim)


def test_no_common_cipher_is_refused_clearly_on_both_sides() -> None:
    sim = simulation((AES,), (CHACHA,))
    sim.advance(1.0)
    # the client: the session ends at once with cipher_mismatch (no retries until the
    # deadline), and knows what the gateway allows
    assert sim.client.state is State.TERMINATED
    ended = of_type(sim.client_events, EventType.SESSION_TERMINATED)
    assert [e.reason_code for e in ended] == [Reason.CIPHER_MISMATCH]
    assert sim.client.handshake.gateway_ciphers == (CHACHA,)
    assert sim.client.handshake.sends == 1
    # the gateway: no session, one SESSION_DENIED naming both sides' ciphers
    assert not sim.gateway.sessions
    (denied,) = [
        e for e in of_type(sim.gateway_events, EventType.POLICY_EVENT)
        if e.policy_name == "SESSION_DENIED"  # type: ignore[attr-defined]
    ]  # fmt: skip
    assert denied.reason_code is Reason.CIPHER_MISMATCH  # type: ignore[attr-defined]
    assert denied.detail == (  # type: ignore[attr-defined]
        f"alice from {sim.links[1].client_addr[0]}:{sim.links[1].client_addr[1]}: no data "
        "cipher in common: the client accepts aes-256-gcm; this gateway allows "
        "chacha20-poly1305"
    )


def test_the_negotiated_cipher_survives_rekeys_and_reattaches() -> None:
    sim = simulation((AES, CHACHA), (AES, CHACHA), rekey_after_s=10)
    sim.advance(25.0)
    rotated = of_type(sim.client_events, EventType.KEY_ROTATED)
    assert len(rotated) >= 2
    assert sim.client.cipher is not None and sim.client.cipher.suite is AES
    assert gateway_session_cipher(sim) is AES
    round_trip(sim)
    epoch = sim.client.peer.epoch
    sim.client.switch_to(2, sim.now)  # a reattach to the other path's address
    sim.advance(2.0)
    assert sim.client.peer.epoch > epoch
    assert sim.client.paths.active == 2
    assert sim.client.snapshot(sim.now).cipher == "aes-256-gcm"
    assert gateway_session_cipher(sim) is AES
    round_trip(sim)


# -- peers without the extension ------------------------------------------------------------


def legacy_exchange(gateway_ciphers: Sequence[DataCipher]) -> tuple[RespPayload, GatewaySessions]:
    """An INIT as a client before the cipher extension wrote it (version 2, no
    extension), answered by a gateway allowing ``gateway_ciphers``: the response payload."""
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[ClientEntry("old", cl_pub, CLIENT_INNER)],
        policy=make_policy(), now=0.0, urandom=random.Random(3).randbytes,
        ciphers=gateway_ciphers,
    )  # fmt: skip
    noise = Initiator(cl_priv, gw_pub)
    payload = InitPayload(PROTOCOL_VERSION, 1_000, 1).pack()
    assert len(payload) == InitPayload.STRUCT.size  # what an old client sends
    body = pack_handshake(MSG_HANDSHAKE_INIT, 0, 4242, noise.write_init(payload))
    gateway.receive_datagram(CookieJar(gw_pub).seal_init(body, 0.0), ("192.0.2.1", 5), 0.0)
    ((_, answer),) = gateway.datagrams_to_send()
    _, message = split_handshake(answer)
    plain, _ = noise.read_response(message)
    resp = RespPayload.parse(plain)
    assert isinstance(resp, RespPayload)
    return resp, gateway


def test_a_client_without_the_extension_gets_chacha20_and_an_unchanged_response() -> None:
    """docs/wire-format.md: no cipher extension back to a client that sent none (it may
    predate every extension and refuse one); its session is ChaCha20-Poly1305."""
    resp, gateway = legacy_exchange(ALL_CIPHERS)
    assert resp.status == 0
    assert resp.ciphers == ()
    assert len(resp.pack()) == RespPayload.FIXED.size  # no endpoints, no extensions
    assert [v.cipher for v in gateway.session_views(0.0)] == [CHACHA.label]


def test_a_client_without_the_extension_is_refused_by_an_aes_only_gateway() -> None:
    resp, gateway = legacy_exchange((AES,))
    assert resp.status == reason_to_wire(Reason.CIPHER_MISMATCH)
    assert resp.ciphers == ()
    assert not gateway.sessions


def answer_init(offer: Sequence[DataCipher], chosen: tuple[int, ...]) -> Reason | Accepted | Drop:
    """A HandshakeInitiator offering ``offer`` gets an accepting response choosing
    ``chosen`` (empty: a gateway without the extension)."""
    gw_priv, gw_pub = generate_keypair()
    cl_priv, _ = generate_keypair()
    hs = HandshakeInitiator(cl_priv, gw_pub, 99, [1], offer=offer)
    _, init = hs.start(0.0, make_policy(), 1_000)
    header = parse_header(init)
    assert not isinstance(header, Drop)
    pending = Responder(gw_priv).read_init(init[12:-32])
    sent = InitPayload.parse(pending.payload)
    assert isinstance(sent, InitPayload) and sent.ciphers == tuple(offer)
    resp = RespPayload(
        PROTOCOL_VERSION, 0, bytes(16), 0, 1, 1, "10.66.0.2", 24, "10.66.0.1", 1420,
        ciphers=chosen,
    )  # fmt: skip
    message, _ = pending.write_response(resp.pack())
    return hs.on_response(pack_handshake(2, 99, 7, message), 99)


def test_the_client_refuses_a_cipher_it_did_not_offer() -> None:
    assert answer_init((CHACHA,), (AES,)) is Reason.CIPHER_MISMATCH
    assert answer_init((AES,), ()) is Reason.CIPHER_MISMATCH  # an old gateway: ChaCha20
    accepted = answer_init((AES, CHACHA), ())
    assert isinstance(accepted, Accepted) and accepted.cipher is CHACHA
    accepted = answer_init((CHACHA, AES), (AES,))
    assert isinstance(accepted, Accepted) and accepted.cipher is AES


# -- payload parsing -----------------------------------------------------------------------------

FIXED = InitPayload(PROTOCOL_VERSION, 123, 1).pack()


def test_init_payload_cipher_lists_round_trip_and_bad_ones_are_malformed() -> None:
    for codes in ((1,), (2, 1), (9, 2)):
        sent = InitPayload(PROTOCOL_VERSION, 123, 1, ciphers=codes)
        assert InitPayload.parse(sent.pack()) == sent
    assert InitPayload.parse(FIXED) == InitPayload(PROTOCOL_VERSION, 123, 1, ciphers=())
    for bad in (b"\x01\x00", b"\x01\x02\x02\x02", b"\x01\x01\x00", b"\x01\x02\x01\x01" * 2):
        assert InitPayload.parse(FIXED + bad) is Drop.MALFORMED, bad.hex()
    assert InitPayload.parse(FIXED + b"\x01\x03\x01") is Drop.TRUNCATED
    assert InitPayload.parse(FIXED + b"\x07\x01\x00") == InitPayload(PROTOCOL_VERSION, 123, 1)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(tail=st.binary(max_size=80))
def test_any_bytes_after_the_init_fields_parse_to_a_payload_or_a_drop(tail: bytes) -> None:
    parsed = InitPayload.parse(FIXED + tail)
    assert isinstance(parsed, (InitPayload, Drop))
    if isinstance(parsed, InitPayload):
        assert InitPayload.parse(parsed.pack()) == parsed
        assert len(set(parsed.ciphers)) == len(parsed.ciphers) and 0 not in parsed.ciphers


@SETTINGS
@given(codes=st.lists(st.integers(1, 255), min_size=1, max_size=16, unique=True))
def test_every_cipher_list_round_trips_in_both_payloads(codes: list[int]) -> None:
    init = InitPayload(PROTOCOL_VERSION, 5, 2, ciphers=tuple(codes))
    assert InitPayload.parse(init.pack()) == init
    resp = RespPayload(
        PROTOCOL_VERSION, 0, bytes(16), 0, 1, 1, "10.66.0.2", 24, "10.66.0.1", 1420,
        ciphers=tuple(codes),
    )  # fmt: skip
    assert RespPayload.parse(resp.pack()) == resp


# -- the configuration keys (docs/client.md, docs/gateway.md: ``ciphers``) ----------------------


def client_config(tmp_path: Path, line: str) -> ClientConfig:
    if not (tmp_path / "client.key").exists():
        write_private_key(tmp_path / "client.key", generate_keypair()[0])
        write_public_key(tmp_path / "gateway.pub", generate_keypair()[1])
    text = (
        f'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n{line}\n'
        '[[path]]\ngateway = "127.0.0.1:51820"\n'
    )
    return parse_client_config(text, source="client.toml", base=tmp_path)


def gateway_config(tmp_path: Path, line: str) -> GatewayConfig:
    for name in ("gateway", "alice"):
        if not (tmp_path / f"{name}.key").exists():
            private, public = generate_keypair()
            write_private_key(tmp_path / f"{name}.key", private)
            write_public_key(tmp_path / f"{name}.pub", public)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'listen = ["127.0.0.1:0"]\nprivate_key = "gateway.key"\ninner_echo = true\n'
        f"workers = 1\n{line}\n"
        '[control]\nsocket = "off"\n[[clients]]\nname = "alice"\npublic_key = "alice.pub"\n'
    )
    return load_gateway_config(path)


def test_the_client_key_takes_an_order_and_refuses_bad_names(tmp_path: Path) -> None:
    assert client_config(tmp_path, "").ciphers is None  # the CPU decides at start
    assert client_config(tmp_path, 'ciphers = ["chacha20-poly1305"]').ciphers == (CHACHA,)
    both = 'ciphers = ["chacha20-poly1305", "aes-256-gcm"]'
    assert client_config(tmp_path, both).ciphers == (CHACHA, AES)
    for bad, why in (
        ('ciphers = ["aes-128-gcm"]', "unknown cipher 'aes-128-gcm'"),
        ("ciphers = []", "at least one cipher is needed"),
        ('ciphers = ["aes-256-gcm", "aes-256-gcm"]', "a cipher is named twice"),
        ('ciphers = "aes-256-gcm"', "expected a list of cipher names"),
        ("ciphers = [1]", "expected a list of cipher names"),
    ):
        with pytest.raises(ClientConfigError) as info:
            client_config(tmp_path, bad)
        assert str(info.value).startswith("client.toml: ciphers = ") and why in str(info.value)


def test_the_gateway_key_allows_both_by_default_and_refuses_bad_names(tmp_path: Path) -> None:
    assert gateway_config(tmp_path, "").ciphers == (AES, CHACHA)
    assert gateway_config(tmp_path, 'ciphers = ["chacha20-poly1305"]').ciphers == (CHACHA,)
    for bad, why in (
        ('ciphers = ["chacha20"]', "unknown cipher 'chacha20'"),
        ("ciphers = []", "at least one cipher is needed"),
        ('ciphers = "aes-256-gcm"', "must be a list of cipher names"),
    ):
        with pytest.raises(GatewayConfigError) as info:
            gateway_config(tmp_path, bad)
        assert "ciphers = " in str(info.value) and why in str(info.value)


def test_an_init_payload_carries_the_previous_session_and_the_ciphers_together() -> None:
    """docs/wire-format.md: message 1's extensions, type 1 (the session continued) and
    type 2 (the cipher offer), travel together and each keeps its value."""
    sent = InitPayload(PROTOCOL_VERSION, 7, 1, bytes(range(16)), ciphers=(2, 1))
    assert InitPayload.parse(sent.pack()) == sent
