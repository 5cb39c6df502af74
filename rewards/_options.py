"""Converting reward-spec option values (text, e.g. `max_new_tokens=64` in `llava_bertscore[max_new_tokens=64]`)
into the types a reward's builder needs. A bad value raises `RewardSpecError` naming the option, so the user
sees one line."""

from ._base import RewardSpecError


def as_int(value, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` (text or int) as an int in [`minimum`, `maximum`]."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise RewardSpecError(f"option {key}={value!r} is not an integer") from None
    if minimum is not None and number < minimum:
        raise RewardSpecError(f"option {key}={number} must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise RewardSpecError(f"option {key}={number} must be at most {maximum}")
    return number


def as_float(value, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` (text or number) as a finite float in [`minimum`, `maximum`]."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise RewardSpecError(f"option {key}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise RewardSpecError(f"option {key}={value!r} is not a finite number")
    if minimum is not None and number < minimum:
        raise RewardSpecError(f"option {key}={number:g} must be at least {minimum:g}")
    if maximum is not None and number > maximum:
        raise RewardSpecError(f"option {key}={number:g} must be at most {maximum:g}")
    return number


def as_list(value, key: str) -> list[str]:
    """A list value: items separated by "|" (`queries=a person|a face`), or a list/tuple already; no empty items."""
    items = [str(item).strip() for item in (value if isinstance(value, (list, tuple)) else str(value).split("|"))]
    if not items or not all(items):
        raise RewardSpecError(f"option {key}={value!r} has an empty item; separate items with '|', e.g. a cat|a dog")
    return items
