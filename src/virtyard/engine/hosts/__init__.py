"""The engine's side of its hosts: one client pool for every host call, the heartbeat."""
