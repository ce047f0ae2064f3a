"""The control socket of a running client or gateway: protocol, server, client (docs/control.md)."""
