"""Subcommands of the discovery tools (registered on the main ``aion`` parser)."""

from __future__ import annotations


def add_discovery_parsers(sub) -> None:
    """Each tool module defines ``add_parser(sub)``; one line per tool below."""
