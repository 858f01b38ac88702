"""Read models shared by the REST API, the web UI and the CLI: database rows → wire models."""
