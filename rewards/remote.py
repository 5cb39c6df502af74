"""A reward scored by a reward server over HTTP (`python -m rewards.serve`): the protocol and the client.

This is how DDPO ran its LLaVA reward on other GPUs (github.com/kvablack/ddpo-pytorch, ddpo_pytorch/rewards.py,
`llava_bertscore`: pickled JPEGs posted to github.com/kvablack/LLaVA-server). Here nothing is pickled: requests
and answers are JSON, and images travel as PNG, which the server decodes with PIL.

Protocol, version 1:

    GET  /info   -> {"reward": spec, "differentiable": false, "version": 1,
                     "max_pixels": int, "max_request_pixels": int, "max_request_bytes": int}   (the server's limits)
    POST /score  {"prompts": [str, ...], "images": [base64 PNG, ...]} -> {"scores": [number or null (NaN), ...]}
    an error -> {"error": message} with 400 (malformed), 413 (over a limit), 408 (the body stalled),
                503 (out of memory, or too many connections) or 500 (a failure while scoring)

Images are quantised to 8 bits, round(255·x) as DDPO's client did, so the PNG round trip itself loses nothing:
an image already on the /255 grid scores exactly as in-process. One request per reward call, split into as few
as fit the limits the server states in /info (the server scores each in chunks); under torchrun every rank is a
client of its own.

    reward_fn = rewards.load("http://127.0.0.1:8085")                         # weight 1
    reward_fn = rewards.load("remote[url=http://gpu7:8085;timeout=300]:0.5,aesthetic:0.1")
"""

import base64
import io
import json
import math
import sys
import time
import urllib.parse

import torch

from ._base import Reward, RewardError, RewardSpecError
from ._options import as_float, as_int

PROTOCOL_VERSION = 1
TIMEOUT = 120.0  # seconds to wait for one answer; DDPO's client used 120 s
RETRIES = 3  # attempts after a failed one (refused, reset, timed out, HTTP 5xx or 408)
BACKOFF = 1.0  # seconds before the first retry, doubling after each
MAX_RETRIES, MAX_BACKOFF, MAX_TIMEOUT = 10, 30.0, 86400.0  # a run waits at most minutes for a server, not forever
SERVE = "python -m rewards.serve --reward SPEC --port {port}"


def check_url(url: str) -> str:
    """`url` without a trailing '/' if it reads http(s)://host[:port][/path]; otherwise RewardSpecError."""
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:  # a port that is not a number
        port_ok = False
    if (parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port_ok or parts.query
            or parts.fragment or parts.username or any(char.isspace() for char in url)):
        raise RewardSpecError(
            f"malformed reward server URL {url!r}; expected http://host:port[/path], e.g. http://127.0.0.1:8085"
        )
    return url.rstrip("/")


def to_uint8(images: torch.Tensor):
    """[B,3,H,W] in [0,1] -> numpy uint8 [B,H,W,3], rounded as DDPO's client and the PIL-based rewards do."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_png(pixels) -> str:
    """uint8 [H,W,3] -> base64 text of its PNG (lossless; low compression level: speed matters more than size)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _read_scores(response, n: int) -> list[float] | str:
    """The scores of an answer, or why they are refused (a malformed answer must never become a reward)."""
    try:
        body = response.json()
    except ValueError:  # not UTF-8, not JSON
        return "not JSON"
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        return "no list of scores"
    if len(scores) != n:
        return f"{len(scores)} scores for {n} images"
    if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores):
        return "a score that is not a number"
    try:
        return [math.nan if s is None else float(s) for s in scores]  # null is how JSON carries NaN
    except OverflowError:  # an integer too large for a float
        return "a score out of range"


class RemoteReward(Reward):
    """The reward served at `url`, never differentiable (only scores cross the wire).

    Failed requests (refused, reset, timed out, HTTP 5xx or 408) are retried `retries` times with exponential
    backoff (each wait at most MAX_BACKOFF s); then, or on another HTTP 4xx, `RewardError` names the URL, the cause
    and the command that starts a server. A batch larger than the request limits the server states in /info is
    sent as several requests. A malformed answer becomes NaN scores and one warning line, so the scripts'
    non-finite guard skips the update. The server's `/info` is read once here: a run fails before training if
    nothing answers."""

    differentiable = False

    def __init__(self, url: str, timeout: float = TIMEOUT, retries: int = RETRIES, backoff: float = BACKOFF):
        super().__init__()
        import httpx2  # huggingface_hub's HTTP client

        self.url, self.retries, self.backoff = check_url(url), retries, backoff
        # trust_env=False: a reward server sits on the local network; an HTTP(S)_PROXY meant for the hub must not
        # reroute its requests.
        self._client = httpx2.Client(timeout=timeout, trust_env=False)
        try:
            info = self._request("GET", "/info").json()
        except ValueError:
            info = None
        if not (isinstance(info, dict) and info.get("version") == PROTOCOL_VERSION
                and isinstance(info.get("reward"), str)):
            raise RewardError(
                f"{self.url}/info did not answer as a reward server of protocol version {PROTOCOL_VERSION} "
                f"(got {_one_line(info, 80)!r}); start one with `{self._serve_command()}`"
            )
        self.served = info["reward"]
        # The server's request limits (absent from older servers: then one request per call).
        self.limits = [limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else math.inf
                       for limit in (info.get("max_request_pixels"), info.get("max_request_bytes"))]
        self.freeze()

    @classmethod
    def build(cls, url: str | None = None, timeout=TIMEOUT, retries=RETRIES, device="cpu", dtype=None):
        """The registry's builder: option values arrive as text."""
        if not url:
            raise RewardSpecError("reward 'remote' needs a server URL: remote[url=http://host:port] or the bare URL")
        return cls(check_url(url), as_float(timeout, "timeout", minimum=0.001, maximum=MAX_TIMEOUT),
                   as_int(retries, "retries", minimum=0, maximum=MAX_RETRIES))

    def _serve_command(self) -> str:
        return SERVE.format(port=urllib.parse.urlsplit(self.url).port or 8085)

    def _request(self, method: str, path: str, **kwargs):
        import httpx2

        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            try:
                response = self._client.request(method, self.url + path, **kwargs)
            except httpx2.TransportError as e:  # connection refused or reset, timeout, broken answer
                cause = f"{type(e).__name__}: {_one_line(e) or 'no details'}"
                continue
            if response.status_code >= 500 or response.status_code == 408:  # busy, out of memory, stalled: it may pass
                cause = f"HTTP {response.status_code}: {_one_line(response.text)}"
                continue
            if response.status_code != 200:  # it refused the request: sending it again changes nothing
                raise RewardError(
                    f"reward server {self.url} refused {method} {path} with HTTP {response.status_code}: "
                    f"{_one_line(response.text)}"
                )
            return response
        raise RewardError(
            f"reward server {self.url} did not answer {method} {path} after {self.retries + 1} attempt(s) ({cause}); "
            f"start one with `{self._serve_command()}` or fix the URL in --reward"
        )

    def _parts(self, pngs: list[str], prompts: list[str], pixels_each: int) -> list[slice]:
        """Consecutive slices of the batch, each within the server's request limits (one image may exceed them:
        the server then says which, with HTTP 413)."""
        max_pixels, max_bytes = self.limits
        parts, start, pixels, size = [], 0, 0, 64  # 64: the JSON object around the lists
        for i, (png, prompt) in enumerate(zip(pngs, prompts)):
            item = len(png) + len(json.dumps(prompt)) + 8  # quotes, commas and spaces
            if i > start and (pixels + pixels_each > max_pixels or size + item > max_bytes):
                parts.append(slice(start, i))
                start, pixels, size = i, 0, 64
            pixels, size = pixels + pixels_each, size + item
        return [*parts, slice(start, len(pngs))]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_batch(images, prompts)
        pngs, prompts = [encode_png(pixels) for pixels in to_uint8(images)], list(prompts)
        scores = []
        for part in self._parts(pngs, prompts, images.shape[-2] * images.shape[-1]):
            payload = {"prompts": prompts[part], "images": pngs[part]}
            answer = _read_scores(self._request("POST", "/score", json=payload), len(payload["prompts"]))
            if isinstance(answer, str):
                print(f"rewards.remote: warning: refused the answer of {self.url}/score ({answer}); this batch's "
                      "rewards are NaN, so the update is skipped", file=sys.stderr)
                return torch.full((len(prompts),), math.nan, dtype=torch.float32, device=images.device)
            scores += answer
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def extra_repr(self) -> str:
        return f"url={self.url!r}, served={getattr(self, 'served', '?')!r}"
