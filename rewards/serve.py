"""Serve any reward over HTTP, the way DDPO ran LLaVA on other GPUs; training scripts use it as `--reward URL`.

    python -m rewards.serve --reward llava_bertscore --port 8085 [--host 127.0.0.1] [--device cuda]
                            [--dtype float16] [--max-batch 16]
    python ddpo_sf.py --reward http://127.0.0.1:8085 ...

The protocol is in rewards/remote.py (JSON, images as base64 PNG). The server trusts nothing it receives: it
never unpickles or evaluates, it reads JSON and decodes PNG with PIL, caps the request size and each image's pixel
count, and answers 400 with a message for anything malformed. It listens on 127.0.0.1 unless --host says otherwise
(there is no authentication). Requests are handled in threads; the reward model scores one request at a time, in
chunks of --max-batch images.
"""

import argparse
import base64
import binascii
import io
import ipaddress
import json
import math
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from . import RewardError, load
from .remote import PROTOCOL_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400); its message goes back to the client."""


def decode_png(data: bytes, max_pixels: int, index: int) -> torch.Tensor:
    """PNG bytes -> float [3,H,W] in [0,1]; anything but a readable PNG of at most `max_pixels` is refused."""
    from PIL import Image

    if not data.startswith(PNG_SIGNATURE):
        raise BadRequest(f"image {index} is not a PNG")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise BadRequest(f"image {index} has {width}x{height} pixels, more than --max-pixels {max_pixels}")
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways of saying "broken"
        raise BadRequest(f"image {index} is not a readable PNG ({type(e).__name__}: {e})") from None
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 255


def parse_request(body: bytes, max_pixels: int) -> tuple[list[str], torch.Tensor]:
    """The prompts and images [B,3,H,W] of a /score request body, or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except ValueError:  # not UTF-8 or not JSON
        raise BadRequest("the body is not JSON") from None
    if not isinstance(request, dict):
        raise BadRequest('expected a JSON object {"prompts": [...], "images": [...]}')
    prompts, images = request.get("prompts"), request.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings')
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest('"images" must be a list of base64 PNG strings')
    if not images or len(images) != len(prompts):
        raise BadRequest(f"expected as many prompts as images, at least one; got {len(prompts)} and {len(images)}")
    decoded = []
    for index, text in enumerate(images):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"image {index} is not base64") from None
        decoded.append(decode_png(data, max_pixels, index))
    if len({image.shape for image in decoded}) > 1:
        raise BadRequest("the images of one request must all have the same size")
    return prompts, torch.stack(decoded)


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one loaded reward; `score` runs under a lock (one model, many client threads)."""

    daemon_threads = True

    def __init__(self, address, reward, spec: str, max_batch: int = 16, max_pixels: int = 4096 * 4096,
                 max_request_bytes: int = 256 * 2**20):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # before the socket is made
        super().__init__(address, _Handler)
        self.reward, self.spec = reward, spec
        self.max_batch, self.max_pixels, self.max_request_bytes = max_batch, max_pixels, max_request_bytes
        self.device = next((t.device for t in [*reward.parameters(), *reward.buffers()]), torch.device("cpu"))
        self.lock = threading.Lock()

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float | None]:
        chunks = [slice(i, i + self.max_batch) for i in range(0, len(prompts), self.max_batch)]
        with self.lock, torch.no_grad():
            scores = torch.cat([self.reward(images[c].to(self.device), prompts[c]).float().cpu() for c in chunks])
        return [s if math.isfinite(s) else None for s in scores.tolist()]  # JSON has no NaN: null


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive: a training run sends one request per reward call
    timeout = 3600  # seconds a connection may stall (a body that never arrives); an idle client just reconnects

    def _send(self, status: int, answer: dict) -> None:
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") != "/info":
            return self._send(404, {"error": f"no such path {self.path!r}; GET /info or POST /score"})
        self._send(200, {"reward": self.server.spec, "differentiable": False, "version": PROTOCOL_VERSION})

    def do_POST(self):
        if self.path.rstrip("/") != "/score":
            self.close_connection = True  # the body is left unread
            return self._send(404, {"error": f"no such path {self.path!r}; GET /info or POST /score"})
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            return self._send(400, {"error": "a request needs a valid Content-Length"})
        if length > self.server.max_request_bytes:
            self.close_connection = True  # refused unread: the rest of the stream is not a request
            return self._send(400, {"error": f"request of {length} bytes exceeds the server's limit of "
                                             f"{self.server.max_request_bytes} (--max-request-mb)"})
        try:
            prompts, images = parse_request(self.rfile.read(length), self.server.max_pixels)
        except BadRequest as e:
            return self._send(400, {"error": str(e)})
        try:
            scores = self.server.score(images, prompts)
        except (RewardError, ValueError) as e:  # the reward refuses this input (e.g. a prompt outside its grammar)
            return self._send(400, {"error": f"the reward refused the request: {' '.join(str(e).split())}"})
        except Exception as e:  # a bug or an out-of-memory in the reward: the client may retry, the server lives on
            traceback.print_exc()
            return self._send(500, {"error": f"scoring failed: {type(e).__name__}: {e}"})
        self._send(200, {"scores": scores})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="reward spec, as the scripts' --reward (e.g. llava_bertscore)")
    parser.add_argument("--port", type=int, default=8085, help="port to listen on; 0 picks a free one (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; not loopback: reachable by others")
    parser.add_argument("--device", default="auto", help="torch device of the reward; auto: cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, else fp32")
    parser.add_argument("--max-batch", type=int, default=16, help="images scored at once (DDPO's LLaVA client: 16)")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image accepted, in pixels")
    parser.add_argument("--max-request-mb", type=float, default=256, help="largest request accepted, in MiB")
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_pixels < 1 or args.max_request_mb <= 0:
        parser.error("--max-batch, --max-pixels and --max-request-mb must be positive")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        reward = load(args.reward, device=device, dtype=dtype)
        server = RewardServer((args.host, args.port), reward, args.reward, args.max_batch, args.max_pixels,
                              int(args.max_request_mb * 2**20))
    except RewardError as e:
        print(f"rewards.serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # address in use, unknown host
        print(f"rewards.serve: error: cannot listen on {args.host}:{args.port} ({e})", file=sys.stderr)
        raise SystemExit(2) from None
    if not _is_loopback(args.host):
        print(f"rewards.serve: warning: listening on {args.host}, not loopback: anyone who reaches this port can "
              "use the reward (there is no authentication)", file=sys.stderr)
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"rewards.serve: serving {args.reward!r} on http://{host}:{port} ({device}, {dtype})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
