"""Bad values on the command line are refused by the parser (exit 2, naming the option and
what it takes) before any node is asked: no traceback, no internal error, no odd state."""

from __future__ import annotations

import pytest

from meshpost.cli import build_parser


@pytest.mark.parametrize("lease", ["nan", "inf", "-3", "0", "86401", "1e12", "soon"])
def test_a_task_lease_that_is_no_number_of_seconds_up_to_a_day_is_a_usage_error(
    lease: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["task", "--node", "A", "--queue", "q", "--sink", "S",
                                   "--lease", lease, "hola"])
    assert exited.value.code == 2
    assert "argument --lease" in capsys.readouterr().err


@pytest.mark.parametrize(("lease", "seconds"), [("0.5", 0.5), ("30", 30.0), ("86400", 86400.0)])
def test_a_task_lease_above_zero_and_at_most_a_day_is_taken(lease: str, seconds: float) -> None:
    args = build_parser().parse_args(["task", "--node", "A", "--queue", "q", "--sink", "S",
                                      "--lease", lease, "hola"])
    assert args.lease == seconds
