"""The host agent's JSON-RPC layer: verb schema, dispatch, errors."""
