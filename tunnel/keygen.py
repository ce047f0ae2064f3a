"""``jvpn-keygen``: X25519 key pairs for jvpn, WireGuard-style base64.

    jvpn-keygen                      print a new private key (like ``wg genkey``)
    jvpn-keygen --out client         write client.key (0600) and client.pub
    jvpn-keygen pubkey < client.key  print the public key of a private key (``wg pubkey``)
    jvpn-keygen fingerprint < client.pub
                                     print the fingerprint of a public key (SHA256:...)

A fingerprint names a public key in log lines: ``SHA256:`` and the first 16 characters of
the base64 SHA-256 of the raw key (``tunnel.core.handshake.fingerprint``). The client and
the gateway print the same one when a handshake is refused.

Exit status: 0 on success, 2 on bad usage or bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import NoReturn

from tunnel.core.handshake import fingerprint, generate_keypair, public_key
from tunnel.keys import (
    MAX_KEY_FILE,
    KeyFormatError,
    check_public_key,
    decode_key,
    encode_key,
    write_private_key,
    write_public_key,
)
from tunnel.version import package_version

PROG = "jvpn-keygen"
EXIT_OK = 0
"""The key (pair) was written or printed."""
EXIT_USAGE = 2
"""Bad usage or bad input, e.g. an existing key file without --force (reason on stderr)."""

_DESCRIPTION = """\
Generate X25519 key pairs for jvpn. Keys are 32 bytes written as one line of base64,
the same format as WireGuard's `wg genkey` / `wg pubkey`.

The client's private key stays on the client; its public key goes on the gateway's
allow-list. The gateway's public key goes into the client configuration."""

_EPILOG = """\
examples:
  jvpn-keygen --out client        write client.key (mode 0600) and client.pub
  jvpn-keygen --out /etc/jvpn/gateway --force
                                  replace an existing gateway key pair
  jvpn-keygen > client.key        print only a private key (keep it secret)
  jvpn-keygen pubkey < client.key print the public key of a private key
  jvpn-keygen fingerprint < client.pub
                                  print the fingerprint of a public key, as the client
                                  and the gateway name it in their messages

exit status: 0 success, 2 bad usage or bad input (reason on stderr)"""


class _UsageError(Exception):
    """Bad command line; the message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {PROG} --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage="%(prog)s [-h] [--out PREFIX [--force]] [genkey | pubkey | fingerprint]",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.key (private, mode 0600) and PREFIX.pub (public) instead of "
        "printing the private key",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --out: replace existing PREFIX.key / PREFIX.pub",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser(
        "genkey",
        help="print a new private key on stdout (the default)",
        description="Print a new private key on stdout (like `wg genkey`).",
    )
    sub.add_parser(
        "pubkey",
        help="read a private key on stdin, print its public key",
        description="Read a base64 private key on stdin and print its public key "
        "(like `wg pubkey`).",
    )
    sub.add_parser(
        "fingerprint",
        help="read a public key on stdin, print its fingerprint (SHA256:...)",
        description="Read a base64 public key on stdin and print its fingerprint, the name "
        "the client and the gateway give it in their messages.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises for user errors)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in ("pubkey", "fingerprint"):
            if args.out is not None or args.force:
                raise _UsageError(f"--out/--force do not apply to {args.command}")
            return _pubkey() if args.command == "pubkey" else _fingerprint()
        if args.force and args.out is None:
            raise _UsageError("--force needs --out")
        if args.out is not None:
            return _write_pair(args.out, force=args.force)
        return _genkey()
    except SystemExit as exc:  # --help / --version from argparse
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except (_UsageError, KeyFormatError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _genkey() -> int:
    warning = _stdout_exposure()
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    private, _public = generate_keypair()
    sys.stdout.write(encode_key(private) + "\n")
    return EXIT_OK


def _stdout_exposure() -> str | None:
    """Like `wg genkey`: warn when the private key goes to a file others can read."""
    try:
        info = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
        return "writing a private key to a file other users can read (try umask 077 or --out)"
    return None


def _stdin_key(what: str) -> bytes:
    """The raw key given as base64 on stdin."""
    try:
        text = sys.stdin.read(MAX_KEY_FILE + 1)
    except UnicodeDecodeError:
        raise KeyFormatError(f"{what} on stdin: not valid base64") from None
    if len(text) > MAX_KEY_FILE:
        raise KeyFormatError(f"{what} on stdin: too large to be a key")
    return decode_key(text, f"{what} on stdin")


def _pubkey() -> int:
    sys.stdout.write(encode_key(public_key(_stdin_key("private key"))) + "\n")
    return EXIT_OK


def _fingerprint() -> int:
    public = check_public_key(_stdin_key("public key"), "public key on stdin")
    sys.stdout.write(fingerprint(public) + "\n")
    return EXIT_OK


def _write_pair(prefix: str, *, force: bool) -> int:
    key_path = Path(prefix + ".key")
    pub_path = Path(prefix + ".pub")
    if not force:
        for path in (key_path, pub_path):
            if path.exists() or path.is_symlink():
                raise _UsageError(f"{path} already exists; use --force to replace it")
    private, public = generate_keypair()
    for path, write, key in (
        (key_path, write_private_key, private),
        (pub_path, write_public_key, public),
    ):
        try:
            write(path, key, force=force)
        except OSError as exc:
            raise _UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {key_path} (private key, mode 0600: keep it secret)")
    print(f"wrote {pub_path} (public key {encode_key(public)}, fingerprint {fingerprint(public)})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
