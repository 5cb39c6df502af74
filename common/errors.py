"""User errors: a mistake in what the user typed ends the run with one line on stderr, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input: a flag out of range, an unknown name, a missing or unreadable file, a model
    that cannot be found, an unusable --resume. The scripts print its message as one line; any other exception
    is a bug and keeps its traceback."""


# Run before `user_errors` exits: common.checkpoint registers the checkpoint of a failing run's last complete step
# (registered there, so that this module imports nothing of common's and no import cycle forms)
FAILURE_HOOKS: list[Callable[[], None]] = []


@contextlib.contextmanager
def user_errors(*more: type[BaseException]):
    """Turn `UserError` (and the exception types in `more`, e.g. `rewards.RewardError`) into one line on stderr and
    exit code 2, the code of a command-line usage error; a training run it ends (a reward server gone) first saves
    a checkpoint of its last complete step (`checkpoint.save_on_failure`):

        with common.user_errors(rewards.RewardError):
            main(common.cli(Args))
    """
    try:
        yield
    except (UserError, *more) as e:
        message = " ".join(str(e).split("\n")) if str(e) else type(e).__name__
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        for hook in FAILURE_HOOKS:  # checkpoint.save_on_failure, registered by common.checkpoint
            hook()
        raise SystemExit(2) from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless `condition`: the one-line form of a flag check."""
    if not condition:
        raise UserError(message)


def check_flags(args, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                fractions: tuple[str, ...] = ()) -> None:
    """Refuse flags out of range with one line naming the flag, its value and the range: `positive` (> 0),
    `non_negative` (≥ 0), `fractions` (in (0, 1]); and any non-finite float flag (NaN, inf)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag(f.name)} must be a finite number, got {value}")
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 < v <= 1, "in (0, 1]")):
        for name in names:
            value = getattr(args, name)
            require(ok(value), f"{flag(name)} must be {what}, got {value}")
