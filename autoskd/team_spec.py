"""Compatibility path: the team-file format now lives in :mod:`autoskd.team.spec`."""

from .team.spec import (TEAMS_DIR, FinetuneSettings, ModelSpec, TeamSpec, _integer, _mapping,  # noqa: F401
                        _number, _sha256, bundled_teams)
