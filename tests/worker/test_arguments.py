"""The number types every command line shares (`worker/arguments.py`), and the flags that use them."""

from __future__ import annotations

import argparse

import pytest

from dicom_gateway import cli as gateway_cli
from worker import admin
from worker import cli as worker_cli
from worker.arguments import CENTURY_SECONDS, int_in, number_in


def test_number_in_takes_its_ends_and_refuses_what_compares_false():
    seconds = number_in(0, 10, "seconds")
    assert seconds("0") == 0 and seconds("10") == 10 and seconds("2.5") == 2.5
    for bad in ("nan", "inf", "-inf", "-0.1", "10.001", "1e300", "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be above 0 to 24 hours, got '0'"):
        number_in(0, 24, "hours", above_low=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="not a number of days: 'x'"):
        number_in(0, 1, "days")("x")


def test_int_in_with_and_without_an_upper_end():
    assert int_in(1)("7") == 7 and int_in(1, 9)("9") == 9
    with pytest.raises(argparse.ArgumentTypeError, match="must be 1 or more, got 0"):
        int_in(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="must be 1 to 9, got 10"):
        int_in(1, 9)("10")
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number: '1.5'"):
        int_in(1)("1.5")


def test_a_century_is_within_what_sleep_and_datetime_take():
    """The upper end of every time flag: `time.sleep` and a `datetime` subtraction still work there."""
    import datetime as dt

    assert dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=CENTURY_SECONDS) > dt.datetime(1900, 1, 1, tzinfo=dt.timezone.utc)
    import threading

    assert CENTURY_SECONDS <= threading.TIMEOUT_MAX  # the most time.sleep and Event.wait take (292 years)


@pytest.mark.parametrize("argv", [
    ["prune-archive", "--older-than-days", "inf"],
    ["prune-archive", "--older-than-days", "30", "--every-hours", "inf"],
    ["prune-archive", "--older-than-days", "30", "--every-hours", "nan"],
    ["prune-archive", "--older-than-days", "1e300"],
    ["stats", "--window-hours", "inf"],
    ["requeue", "--older-than", "1e300"],
    ["list", "--limit", "0"],
    ["reprocess", "--limit", "99999999999999999999"],
])
def test_admin_refuses_out_of_range_numbers_before_anything_runs(argv, capsys):
    """`prune-archive --every-hours inf` pruned once and then crashed in `time.sleep` (OverflowError), and
    `--older-than-days inf` ran and reported "received more than inf days ago"."""
    with pytest.raises(SystemExit) as exited:
        admin.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and argv[-2] in err and "Traceback" not in err


@pytest.mark.parametrize("main, argv", [
    (worker_cli.main, ["run", "-c", "0"]),
    (worker_cli.main, ["calibrate", "--cases", "c.csv", "--site", "s", "--out", "o.json", "--batch-size", "0"]),
    (gateway_cli.main, ["sweep", "--min-age", "inf"]),
    (gateway_cli.main, ["sweep", "--min-age", "-1"]),
])
def test_worker_and_gateway_refuse_out_of_range_numbers(main, argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and argv[-2] in capsys.readouterr().err
