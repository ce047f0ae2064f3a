"""jvpn-keygen and the key-file helpers it shares with the gateway and the client."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.core.handshake import generate_keypair, public_key
from tunnel.keygen import main
from tunnel.keys import (
    KeyFormatError,
    decode_key,
    encode_key,
    insecure_permissions,
    load_private_key,
    load_public_key,
)

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err: str) -> None:
    assert err.startswith("jvpn-keygen: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


# -- key text ------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    private, _ = generate_keypair()
    text = encode_key(private)
    assert len(text) == 44 and text.endswith("=")
    assert decode_key(text + "\n", "key") == private
    assert decode_key(text.encode(), "key") == private


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64 at all!", "gateway public key: not valid base64"),
        ("", "gateway public key: empty"),
        (base64.b64encode(bytes(31)).decode(), "gateway public key: expected 32 bytes, got 31"),
        ("héllo", "gateway public key: not valid base64"),
    ],
)
def test_decode_key_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        decode_key(text, "gateway public key")
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_load_keys_from_files_and_inline(tmp_path: Path) -> None:
    private, public = generate_keypair()
    key_file = tmp_path / "c.key"
    key_file.write_text(encode_key(private) + "\n")
    pub_file = tmp_path / "c.pub"
    pub_file.write_text(encode_key(public))
    assert load_private_key(key_file) == private
    assert load_public_key(str(pub_file)) == public
    assert load_public_key(encode_key(public)) == public


def test_load_errors_name_the_file_not_the_key(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    bad = tmp_path / "bad.key"
    bad.write_text(encode_key(private)[:-2] + "\n")  # damaged: missing padding
    with pytest.raises(KeyFormatError) as info:
        load_private_key(bad)
    assert str(info.value) == f"private key file {bad}: not valid base64"
    assert encode_key(private)[:20] not in str(info.value)

    missing = tmp_path / "nope.pub"
    with pytest.raises(KeyFormatError, match=r"gateway key file .*nope\.pub: no such file"):
        load_public_key(missing, what="gateway key")
    with pytest.raises(KeyFormatError, match="is a directory"):
        load_private_key(tmp_path)
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"A" * 10_000)
    with pytest.raises(KeyFormatError, match="too large"):
        load_private_key(huge)


def test_low_order_public_key_refused() -> None:
    with pytest.raises(KeyFormatError, match="not a usable X25519 public key"):
        load_public_key(encode_key(bytes(32)), what="gateway public key")


# -- CLI in-process ------------------------------------------------------------------------


def test_no_args_prints_private_key_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([], capsys)
    assert code == 0 and err == ""
    assert len(decode_key(out, "out")) == 32
    assert out.count("\n") == 1


def test_out_writes_pair_with_private_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "client"
    old_umask = os.umask(0)  # even a permissive umask must not widen the private key
    try:
        code, out, _err = _run(["--out", str(prefix)], capsys)
    finally:
        os.umask(old_umask)
    assert code == 0
    key_file, pub_file = tmp_path / "client.key", tmp_path / "client.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert insecure_permissions(key_file) is None
    private = load_private_key(key_file)
    assert load_public_key(pub_file) == public_key(private)
    assert encode_key(private) not in out  # the secret is never printed with --out
    assert encode_key(public_key(private)) in out


def test_refuses_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = str(tmp_path / "gw")
    assert _run(["--out", prefix], capsys)[0] == 0
    before = (tmp_path / "gw.key").read_bytes()
    code, out, err = _run(["--out", prefix], capsys)
    assert code == 2 and out == ""
    _assert_one_line_error(err)
    assert "already exists" in err and "--force" in err
    assert (tmp_path / "gw.key").read_bytes() == before

    assert _run(["--out", prefix, "--force"], capsys)[0] == 0
    assert (tmp_path / "gw.key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "gw.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw.key", "gw.pub"]  # no temp left


def test_pubkey_from_stdin_matches(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate_keypair()
    monkeypatch.setattr(sys, "stdin", io.StringIO(encode_key(private) + "\n"))
    code, out, err = _run(["pubkey"], capsys)
    assert (code, out, err) == (0, encode_key(public) + "\n", "")


def test_pubkey_bad_input_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("garbage\n"))
    code, out, err = _run(["pubkey"], capsys)
    assert code == 2 and out == ""
    _assert_one_line_error(err)
    assert "private key on stdin: not valid base64" in err


@pytest.mark.parametrize(
    "argv", [["--frobnicate"], ["--force"], ["--out", "x", "pubkey"], ["pubkey", "extra"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    _assert_one_line_error(err)


def test_help_is_helpful(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = _run(["--help"], capsys)
    assert code == 0
    for needle in ("--out", "--force", "pubkey", "0600", "wg genkey", "exit status"):
        assert needle in out


def test_unwritable_destination_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _run(["--out", str(tmp_path / "missing-dir" / "k")], capsys)
    assert code == 2
    _assert_one_line_error(err)
    assert "cannot write" in err


# -- CLI as a real process -----------------------------------------------------------------


def _subprocess(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tunnel.keygen", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
        check=False,
    )


def test_subprocess_genkey_pubkey_and_bad_file(tmp_path: Path) -> None:
    generated = _subprocess(["--out", str(tmp_path / "p")])
    assert generated.returncode == 0, generated.stderr
    assert stat.S_IMODE((tmp_path / "p.key").stat().st_mode) == 0o600

    private_text = (tmp_path / "p.key").read_text()
    derived = _subprocess(["pubkey"], stdin=private_text)
    assert derived.returncode == 0
    assert derived.stdout == (tmp_path / "p.pub").read_text()

    broken = _subprocess(["pubkey"], stdin="this is not a key")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr == "jvpn-keygen: error: private key on stdin: not valid base64\n"


def test_subprocess_warns_when_private_key_goes_to_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "out.key"
    target.touch(mode=0o644)
    target.chmod(0o644)
    with target.open("w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "tunnel.keygen"],
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=30,
            check=False,
        )
    assert result.returncode == 0
    assert "warning: writing a private key to a file other users can read" in result.stderr
    assert len(load_private_key(target)) == 32
