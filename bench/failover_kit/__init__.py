"""The parts of bench/failover.py: inner flows, path kills, and the tunnels it compares.

A subdirectory so that ``make bench`` (every ``bench/*.py``) does not run them alone.
"""
