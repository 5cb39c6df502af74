"""User errors: a mistake in what the user typed ends the run with one line on stderr, never a traceback."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input: a flag out of range, an unknown name, a missing or unreadable file, a model
    that cannot be found, an unusable --resume. The scripts print its message as one line; any other exception
    is a bug and keeps its traceback."""


@contextlib.contextmanager
def user_errors(*more: type[BaseException]):
    """Turn `UserError` (and the exception types in `more`, e.g. `rewards.RewardError`) into one line on stderr and
    exit code 2, the code of a command-line usage error:

        with common.user_errors(rewards.RewardError):
            main(tyro.cli(Args))
    """
    try:
        yield
    except (UserError, *more) as e:
        message = " ".join(str(e).split("\n")) if str(e) else type(e).__name__
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
