"""Reading a TOML configuration file into a pydantic model, with one-line errors.

Both daemons (the engine and the host agent) read their settings this way, so a missing file,
bad TOML or a bad setting reads the same everywhere: the file, the setting's dotted name, why.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """The configuration file is missing, not TOML, or has a bad setting (named)."""


def read_toml(path: Path, model: type[M]) -> M:
    """``path`` validated as ``model``; :class:`ConfigError` naming the problem."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: setting '{where}': {err['msg']}") from None
