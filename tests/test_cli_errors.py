"""One place turns user-facing errors into exit code 2 (``cli.output.user_errors``): an ``EvidriftError``
prints one ``error:`` line; every other exception keeps its traceback (a bug must not look like a typo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from evidrift.cli.app import COMMANDS, app
from evidrift.cli.output import user_errors
from evidrift.core.errors import DataError, EvidriftError, MissingInputError, UsageError


def _app_with(command) -> typer.Typer:
    toy = typer.Typer()
    toy.command()(user_errors(command))
    toy.command("noop")(lambda: None)  # two commands: typer then needs the command's name
    return toy


def test_an_evidrift_error_exits_2_with_one_line() -> None:
    def broken(name: str = "x") -> None:
        raise UsageError(f"--name {name!r}: unknown; choose a or b")

    result = CliRunner().invoke(_app_with(broken), ["broken", "--name", "zz"])
    assert result.exit_code == 2
    assert "error: --name 'zz': unknown; choose a or b" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_any_other_exception_keeps_its_traceback() -> None:
    def buggy() -> None:
        raise ValueError("shape mismatch: a bug, not a user error")

    result = CliRunner().invoke(_app_with(buggy), ["buggy"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "error:" not in result.output


@pytest.mark.parametrize("kind", [UsageError, DataError, MissingInputError])
def test_error_kinds_keep_their_builtin_base(kind: type[EvidriftError]) -> None:
    assert issubclass(kind, EvidriftError)
    assert issubclass(kind, FileNotFoundError if kind is MissingInputError else ValueError)


def test_every_command_is_registered_through_the_decorator() -> None:
    registered = {c.callback.__wrapped__ for c in app.registered_commands}  # type: ignore[union-attr]
    assert registered == set(COMMANDS)


def test_a_real_command_reports_a_missing_study_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml does not exist" in " ".join(result.output.split())
