"""Fetching reward weights from the Hugging Face Hub (cached under $HF_HOME) or taking local copies.

Every failure to fetch becomes a `WeightsNotFound` that names the repo, the files and the command that
downloads them, so that an offline machine tells the user exactly what to copy over. A local copy that exists but
does not load (a directory that is not a transformers model, a text file given as a checkpoint) becomes
`InvalidWeights` naming the path: both are one line for the user, never a traceback."""

import contextlib
import os
from typing import Any, Callable, Sequence

from ._base import RewardError


class WeightsNotFound(RewardError, FileNotFoundError):
    """Reward weights are neither in the Hugging Face cache nor downloadable (offline?), or a given local path
    does not exist."""


class InvalidWeights(RewardError):
    """A local path given for a reward's weights exists but cannot be loaded as what the reward needs (or a hub
    repo the user named holds something else)."""


class Unreadable(ValueError):
    """Raised by the readers of weights (`torch_load`, a reward's own checks) for a file or folder of the wrong
    kind; its message says what is wrong in words, and `reading` shows it as it is."""


def _raise(repo: str, download_args: Sequence[str], error: Exception):
    reason = (str(error).strip().splitlines() or [""])[0]
    raise WeightsNotFound(
        f"Could not fetch reward weights from the Hugging Face Hub repo '{repo}' and they are not in the local "
        f"cache ({type(error).__name__}: {reason}).\n"
        f"Download them where there is network with\n    hf download {repo} {' '.join(download_args)}\n"
        f"(`huggingface-cli download` on older huggingface_hub) and copy the Hugging Face cache ($HF_HOME) to "
        f"this machine, or add `--local-dir DIR` and pass that local path to the reward loader."
    ) from error


@contextlib.contextmanager
def reading(local: str | None, what: str, hub: bool = False):
    """Around the code that reads `local`, a local copy of `what` that the user gave: whatever fails there (torch's
    unpickler, transformers' loaders, a state dict of another model, JSON) fails because of that copy, and becomes
    one InvalidWeights line naming the path. With `local` None (the default hub copy) nothing is caught; with `hub`
    (`local` is a hub id the user named) only `Unreadable` and `RewardError`, the wrong kinds a reward checks for:
    other failures there are not the user's, and keep their traceback."""
    try:
        yield
    except (WeightsNotFound, InvalidWeights):
        raise
    except Exception as e:
        checked = isinstance(e, (Unreadable, RewardError))  # a reward's own check of the contents: its words
        if not local or (hub and not checked):
            raise
        text = " ".join(str(e).split())  # transformers' and torch's multi-line messages as one line
        text = text if len(text) <= 240 else text[:240] + "…"
        reason = text if checked else f"{type(e).__name__}: {text}" if text else type(e).__name__
        raise InvalidWeights(f"{'hub repo ' if hub else ''}{local!r} is not a valid {what} ({reason})") from e


def torch_load(path: str):
    """A file written by `torch.save`, read on the CPU with `weights_only` (no code in it runs). Anything else (text,
    another format, a truncated file) raises `Unreadable` saying so: torch's own errors range from IndexError to
    an UnpicklingError that advises `weights_only=False`, which would run the file's code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):  # not the file's kind: unreadable, or too large here
        raise
    except Exception as e:
        raise Unreadable(f"not a PyTorch checkpoint of tensors written by torch.save: {type(e).__name__}") from e


def file(repo: str, filename: str, local: str | None = None) -> str:
    """Path of `filename` from hub repo `repo`, or the local file `local` when given."""
    if local:
        path = os.path.expanduser(local)
        if os.path.exists(path) and not os.path.isfile(path):
            raise InvalidWeights(f"{local!r} is not a file (expected {filename} from hub repo '{repo}')")
        if not os.path.isfile(path):
            raise WeightsNotFound(f"local file {local!r} (expected {filename} from hub repo '{repo}') does not exist")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except (OSError, EntryNotFoundError) as e:  # LocalEntryNotFoundError, offline mode, HTTP errors
        _raise(repo, [filename], e)


def load_file(repo: str, filename: str, local: str | None, read: Callable[[str], Any] = torch_load):
    """`read(path)` of `filename` from hub repo `repo`, or of the local file `local` when given (see `file`); a
    local file that `read` fails on is one InvalidWeights line naming it."""
    path = file(repo, filename, local)
    with reading(local, f"copy of {filename} from hub repo '{repo}'"):
        return read(path)


def _has_vocabulary(loaded):
    """`loaded`, unless it is a tokenizer (or a processor's) of special tokens only: transformers builds one without
    a word from a folder whose config.json names the model type but that holds no tokenizer files, and every word
    of every prompt would then be unknown."""
    tokenizer = getattr(loaded, "tokenizer", loaded)
    special = getattr(tokenizer, "all_special_ids", None)
    if special is not None and len(tokenizer) <= len(set(special)):
        raise Unreadable("its tokenizer has no vocabulary: no tokenizer.json, vocab.txt or vocab.json in it")
    return loaded


def pretrained(from_pretrained: Callable, repo_or_dir: str, download_args: Sequence[str]):
    """`from_pretrained(repo_or_dir)` (transformers), turning a failed download into `WeightsNotFound` and a local
    directory that does not load (or a hub repo that `from_pretrained` finds `Unreadable`) into `InvalidWeights`.

    `download_args` are the `hf download` arguments that fetch what the loader needs (file names or
    `--include` patterns)."""
    local = os.path.expanduser(repo_or_dir)
    if os.path.isdir(local):
        with reading(repo_or_dir, "local copy in transformers' format"):
            return _has_vocabulary(from_pretrained(local))
    if os.path.exists(local):
        raise InvalidWeights(f"{repo_or_dir!r} is not a directory (expected a hub id or a local copy in "
                               "transformers' format)")
    if os.path.isabs(local) or repo_or_dir.startswith((".", "~")):
        raise WeightsNotFound(f"local directory {repo_or_dir!r} does not exist")
    try:
        with reading(repo_or_dir, "model for this reward", hub=True):
            loaded = from_pretrained(repo_or_dir)
    except OSError as e:  # transformers reports "couldn't connect / not in the cache" as OSError
        _raise(repo_or_dir, download_args, e)
    try:
        return _has_vocabulary(loaded)
    except Unreadable as e:  # offline, transformers builds a tokenizer without its files rather than fail
        _raise(repo_or_dir, download_args, e)
