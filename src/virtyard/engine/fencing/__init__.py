"""Power management: fence drivers that power a host off, on, and say whether it is off."""
