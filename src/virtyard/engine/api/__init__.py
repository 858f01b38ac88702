"""The oVirt-v4-compatible REST layer: wire types, codec, routes, faults. No business rules."""
