"""Admin client commands: `gateway weights`, `gateway strategy` (SPEC §4, §10)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Register the admin-client subcommands on the main parser."""
    _ = (sub, argparse)
