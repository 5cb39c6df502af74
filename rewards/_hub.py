"""Fetching reward weights from the Hugging Face Hub (cached under $HF_HOME) or taking local copies.

Every failure to fetch becomes a `WeightsNotFound` that names the repo, the files and the command that
downloads them, so that an offline machine tells the user exactly what to copy over."""

import os
from typing import Callable, Sequence

from ._base import RewardError


class WeightsNotFound(RewardError, FileNotFoundError):
    """Reward weights are neither in the Hugging Face cache nor downloadable (offline?), or a given local path
    does not exist."""


def _raise(repo: str, download_args: Sequence[str], error: Exception):
    reason = (str(error).strip().splitlines() or [""])[0]
    raise WeightsNotFound(
        f"Could not fetch reward weights from the Hugging Face Hub repo '{repo}' and they are not in the local "
        f"cache ({type(error).__name__}: {reason}).\n"
        f"Download them where there is network with\n    hf download {repo} {' '.join(download_args)}\n"
        f"(`huggingface-cli download` on older huggingface_hub) and copy the Hugging Face cache ($HF_HOME) to "
        f"this machine, or add `--local-dir DIR` and pass that local path to the reward loader."
    ) from error


def file(repo: str, filename: str, local: str | None = None) -> str:
    """Path of `filename` from hub repo `repo`, or the local file `local` when given."""
    if local:
        if not os.path.isfile(os.path.expanduser(local)):
            raise WeightsNotFound(f"local file {local!r} (expected {filename} from hub repo '{repo}') does not exist")
        return os.path.expanduser(local)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except (OSError, EntryNotFoundError) as e:  # LocalEntryNotFoundError, offline mode, HTTP errors
        _raise(repo, [filename], e)


def pretrained(from_pretrained: Callable, repo_or_dir: str, download_args: Sequence[str]):
    """`from_pretrained(repo_or_dir)` (transformers), turning a failed download into `WeightsNotFound`.

    `download_args` are the `hf download` arguments that fetch what the loader needs (file names or
    `--include` patterns)."""
    local = os.path.expanduser(repo_or_dir)
    if os.path.isdir(local):
        return from_pretrained(local)
    if os.path.isabs(local) or repo_or_dir.startswith((".", "~")):
        raise WeightsNotFound(f"local directory {repo_or_dir!r} does not exist")
    try:
        return from_pretrained(repo_or_dir)
    except OSError as e:  # transformers reports "couldn't connect / not in the cache" as OSError
        _raise(repo_or_dir, download_args, e)
