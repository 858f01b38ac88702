"""Every user action is one command of one shape: validate → execute → events (``base``)."""
