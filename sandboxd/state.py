"""Where sandboxd keeps its state: generated image layers, later the database."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/sandboxd")


def user_state_dir_for(user: str) -> Path:
    """The directory `sandboxd setup --user NAME` prepares, for users with no writable home."""
    return SYSTEM_STATE_DIR / "users" / user


def default_state_dir() -> Path:
    explicit = os.environ.get("SANDBOXD_STATE_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    prepared = user_state_dir_for(pwd.getpwuid(os.geteuid()).pw_name)
    if prepared.is_dir() and prepared.stat().st_uid == os.geteuid():
        return prepared
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "sandboxd"
