"""jvpn-impair, the userspace impairment relay. Imports nothing else of ``tunnel``."""
