"""``virtyard-hostsim``: many simulated host agents in one process, for sizing an engine.

Each simulated host speaks the host agent's exact protocol (JSON-RPC 2.0 over HTTPS with
mutual TLS, the same verb names, parameter and result models and error codes) on a port of
its own, and keeps its VMs, disks, LUNs and connections in memory. See ``docs/hostsim.md``.
"""
