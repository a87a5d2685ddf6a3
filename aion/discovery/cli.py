"""Subcommands of the discovery tools (registered on the main ``aion`` parser)."""

from __future__ import annotations


def add_discovery_parsers(sub) -> None:
    """Each tool module defines ``add_parser(sub)``; one line per tool below."""
    from aion.discovery.maps import add_parser as add_map_parser  # aion map

    add_map_parser(sub)
    from aion.discovery.search_cli import add_parser as add_search_parsers  # aion search, aion outliers

    add_search_parsers(sub)
    from aion.discovery.evaluate import add_parser as add_discovery_eval_parser  # aion discovery-eval

    add_discovery_eval_parser(sub)
    from aion.discovery.residualize import add_parser as add_residualize_parser  # aion residualize

    add_residualize_parser(sub)
