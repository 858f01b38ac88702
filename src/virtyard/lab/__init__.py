"""The lab: real iSCSI storage, libvirt hypervisor hosts and a tiny guest on one machine.

Everything Virtyard does is tested against these real parts; see docs/ARCHITECTURE.md.
"""
