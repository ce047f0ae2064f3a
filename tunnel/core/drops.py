"""Why an inbound datagram was dropped: one counted reason per drop, never an exception.

A drop is bad input from the network (STYLE: "dropped, counted, reported as an event,
never raised"). The protocol machines count drops per reason and report the counts in
rate-limited DROP_SUMMARY events so a flood cannot flood the event stream too.
"""

from __future__ import annotations

from enum import StrEnum


class Drop(StrEnum):
    """Reason a datagram was discarded before it could change anything."""

    TRUNCATED = "truncated"
    """Shorter than the fixed part of its message type."""
    OVERSIZED = "oversized"
    """Longer than MAX_DATAGRAM or than its message type allows."""
    MALFORMED = "malformed"
    """Right length, but a field holds an impossible value (reserved bits, bad enum)."""
    UNKNOWN_TYPE = "unknown_type"
    """First byte is not a message type we know."""
    UNKNOWN_SESSION = "unknown_session"
    """receiver_index names no live session."""
    BAD_TAG = "bad_proof"
    """AEAD authentication failed: wrong key, tampered or forged."""
    REPLAY = "replay_detected"
    """A replay: a counter already seen, or older than the replay window, from an address
    that is not a validated path of the session; or duplicates above the session's alarm
    line (``duplicate_alarm_ratio`` of its datagrams over about a second, plus a slack of
    8). Reported as a SECURITY_EVENT."""
    TOO_OLD = "too_old"
    """Authentic, but its counter is below the replay window, from a validated path: a
    datagram that arrived late (a slower path, a switch). Counted, no SECURITY_EVENT."""
    DUPLICATE = "duplicate"
    """Authentic, its counter already seen inside the window, from a validated path, while
    the session's duplicates stay below the alarm line: a copy the network made. Counted,
    no SECURITY_EVENT."""
    UNKNOWN_KEY_PHASE = "unknown_key_phase"
    """Key phase is neither the current, the previous nor the next one."""
    HANDSHAKE_FAILED = "handshake_failed"
    """Noise handshake message did not verify."""
    UNKNOWN_CLIENT_KEY = "unknown_client_key"
    """Handshake from a static key that is not on the gateway's allow-list."""
    RATE_LIMITED = "rate_limited"
    """Over a per-source or global rate limit; dropped before expensive work."""
    WRONG_STATE = "wrong_state"
    """Authentic, but not acceptable in the session's current state (e.g. TERMINATED)."""
    KEY_EXHAUSTED = "key_exhausted"
    """Counter space of the current keys is used up (needs a rekey)."""
    BAD_MAC = "bad_mac"
    """HANDSHAKE_INIT whose mac1 is wrong (sender does not know our public key): no DH spent."""
    COOKIE_REQUIRED = "cookie_required"
    """HANDSHAKE_INIT without a valid cookie (mac2) while under load: answered by a
    COOKIE_REPLY instead of a handshake."""
    AMPLIFICATION_LIMIT = "amplification_limit"
    """A PATH_CHALLENGE to an unvalidated address was not sent: it would exceed 3x the bytes
    received from that address (DESIGN D4 anti-amplification)."""
    UNEXPECTED_PATH_RESPONSE = "unexpected_path_response"
    """PATH_RESPONSE from an address with no outstanding challenge, or with a wrong token."""
    UNVALIDATED_PATH = "unvalidated_path"
    """Authentic data from an address not (yet) validated for the session; a NAT rebinding
    is checked by a PATH_CHALLENGE, the data itself is not delivered."""
    IPV6_NOT_ROUTED = "ipv6_not_routed"
    """Inner IPv6 packet where IPv6 is not carried: from the gateway's TUN while the gateway
    has no inner IPv6 subnet (``tun.subnet6``), or from a client whose session has no inner
    IPv6 address."""
    NO_ROUTE = "no_route"
    """Gateway TUN packet whose destination is no live session's inner address."""
    INNER_SOURCE_SPOOFED = "inner_source_spoofed"
    """Inner packet from a client whose source address is not that client's inner address
    (IPv4, or IPv6 when the session has one): a client may only send as itself."""
    QUEUE_OVERFLOW = "queue_overflow"
    """Gateway TUN packet for a session without a binding, beyond the policy's outbound
    queue limits (packets or bytes)."""
    FOREIGN_SOURCE = "foreign_source"
    """Client: a datagram on a path socket from an address other than that path's gateway
    (counted by the engine's loop; the session never sees it)."""
    INNER_IPV6_DROPPED = "inner_ipv6_dropped"
    """Client: an IPv6 packet from the host while the session has no inner IPv6 address
    (its gateway has no inner IPv6 subnet); the session does not carry it."""
    INNER_MALFORMED = "inner_malformed"
    """Client: a packet from the host (the TUN) that is neither IPv4 nor IPv6."""
    SESSION_STILL_LIVE = "session_still_live"
    """Gateway: a HANDSHAKE_INIT that names a session it still holds for that client (a
    client asking whether its session was lost, DESIGN D15c): not answered, the session
    stays (the client's reattach is answered instead)."""
    RETIRED_KEY_PHASE = "retired_key_phase"
    """Gateway: authentic, but sealed in a key phase this process retired when it resumed
    the session from the store (DESIGN D15a: it accepts only a phase the process before it
    never opened anything in): a replay of what that process had accepted, or the client's
    own datagram sent before it followed the new phase (answered with a REKEY in the new
    phase). Reported as a SECURITY_EVENT ``RETIRED_KEY_PHASE``."""
    OWNER_LOOKUP = "owner_lookup"
    """Gateway cluster node: a datagram for a session no session here has; the node looks
    its receiver index up in etcd and takes the session over if it may (docs/cluster.md).
    The newest such datagram per index is held and fed once the session is here."""
    OWNER_FENCED = "owner_fenced"
    """Gateway cluster node: a datagram or inner packet not sent because the node's lease
    fence is closed (it may no longer be the owner of its sessions)."""
    HANDSHAKE_REPEATED = "handshake_repeated"
    """Gateway: a retried HANDSHAKE_INIT of the client attempt (same sender index) whose
    session this gateway opened and has not heard from yet: answered with the same
    HANDSHAKE_RESP again, no second session (the client may already use the first)."""
