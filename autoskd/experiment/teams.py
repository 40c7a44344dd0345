"""The experiment's ``team:``: a path (or bundled name) is read and written inline, so the
resolved file stands alone, and a run rebuilds its team from that mapping.

A team is either a classification team (:class:`autoskd.team.TeamSpec`) or, with ``kind: lm``, a
team of causal LMs (:class:`autoskd.lm.team.LMTeam`). Both are checked here without loading a
model: the team files' own parsers do the checking, so their messages stay the ones users know.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from ..atomic import atomic_path
from ..errors import AutoSKDError

#: bundled team names (``teams/<name>.yaml``), so the defaults work from any working directory
DEFAULT_TEAM = "minilm-ladder"
DEFAULT_LM_TEAM = "smollm2"


def is_lm_team(team: Mapping) -> bool:
    return team.get("kind") == "lm"


def team_file(ref: str) -> Path:
    """The file a team reference names: a path, or a bundled team's bare name (``minilm-ladder``)."""
    from ..team.spec import TEAMS_DIR, bundled_teams

    path = Path(ref).expanduser()
    if path.is_file():
        return path
    bundled = TEAMS_DIR / f"{ref}.yaml"
    if "/" not in str(ref) and bundled.is_file():
        return bundled
    raise AutoSKDError(f"team file '{ref}' not found; pass a path to a YAML team file "
                       f"(bundled teams: {', '.join(bundled_teams()) or 'none'})")


def resolve_team(ref: Any) -> dict:
    """The team as an inline mapping (with its ``name``), checked; ``ref`` is a path or a mapping."""
    if isinstance(ref, Mapping):
        data = dict(ref)
        data.setdefault("name", "team")
        check_team(data)
        return data
    if not isinstance(ref, (str, Path)) or not str(ref).strip():
        raise AutoSKDError(f"team must be a team file (e.g. teams/minilm-ladder.yaml) or a team mapping, got {ref!r}")
    path = team_file(str(ref))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise AutoSKDError(f"team file {path} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, Mapping):
        raise AutoSKDError(f"team file {path} must be a mapping with student and teachers; "
                           "see teams/minilm-ladder.yaml for the format")
    data = dict(data)
    if is_lm_team(data):  # the file's own parser, for its messages
        from ..lm.team import LMTeam

        LMTeam.from_yaml(path)
    else:
        from ..team.spec import TeamSpec

        TeamSpec.from_yaml(path)
    data.setdefault("name", path.stem)
    return data


def check_team(team: Mapping) -> None:
    """Parse an inline team as its file would be parsed (no model is loaded)."""
    if is_lm_team(team):
        with lm_team_file(team):
            pass
    else:
        from ..team.spec import TeamSpec

        TeamSpec.from_dict(dict(team), where="team")


def teacher_names(team: Mapping) -> list[str]:
    """The team's teacher names, as its parser names them."""
    if is_lm_team(team):
        from ..lm.team import LMTeam

        with lm_team_file(team) as path:
            return list(LMTeam.from_yaml(path).teacher_specs)
    from ..team.spec import TeamSpec

    return [t.name for t in TeamSpec.from_dict(dict(team), where="team").teachers]


def classifier_team(team: Mapping):
    """An unbuilt :class:`autoskd.team.TeacherTeam` from the inline mapping."""
    from ..team import TeacherTeam
    from ..team.spec import TeamSpec

    return TeacherTeam(TeamSpec.from_dict(dict(team), where="team"))


def lm_team(team: Mapping):
    """An unbuilt :class:`autoskd.lm.team.LMTeam` from the inline mapping."""
    from ..lm.team import LMTeam

    with lm_team_file(team) as path:
        return LMTeam.from_yaml(path)


@contextlib.contextmanager
def lm_team_file(team: Mapping) -> Iterator[Path]:
    """The mapping as a team file for the while of the block: ``LMTeam`` reads files only.
    A problem in it names the team, not the temporary file."""
    with tempfile.TemporaryDirectory(prefix="autoskd-team-") as folder:
        path = Path(folder) / "team.yaml"
        write_team(team, path)
        try:
            yield path
        except AutoSKDError as err:
            raise AutoSKDError(str(err).replace(str(path), "team")) from None


def write_team(team: Mapping, path: Path) -> Path:
    """The team mapping as a YAML team file (search and tune trials read the team from a file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(dict(team), sort_keys=False), encoding="utf-8")
    return path
