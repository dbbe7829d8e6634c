"""User errors are one line on stderr, named after the command, printed by one rank (`iared.errors`)."""

import pytest

from iared import errors


@pytest.fixture(autouse=True)
def program():
    yield
    errors.set_program("iared")


def test_report_is_one_line_naming_the_command(capsys):
    errors.set_program("iared train")
    errors.report("--groups must be at least 1")
    out, err = capsys.readouterr()
    assert out == "" and err == "iared train: error: --groups must be at least 1\n"


@pytest.mark.parametrize("rank, prints", [(None, True), ("0", True), ("1", False)])
def test_only_rank_0_prints(monkeypatch, rank, prints):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert errors.prints_here() is prints


def test_user_errors_are_value_errors_not_yet_reported():
    e = errors.ErrorOnOtherRank("bad")
    assert isinstance(e, errors.UserError) and isinstance(e, ValueError)
    assert e.reported is False
