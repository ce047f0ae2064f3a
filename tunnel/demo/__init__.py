"""The zero-setup demo: an embedded gateway, impairment relays and a scripted timeline,
plugged into the client engine from outside."""
