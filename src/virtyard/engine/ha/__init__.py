"""High availability: restart HA VMs that crashed or whose host is known to be off."""
