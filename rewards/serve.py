"""Serve any reward over HTTP, the way DDPO ran LLaVA on other GPUs; training scripts use it as `--reward URL`.

    python -m rewards.serve --reward llava_bertscore --port 8085 [--host 127.0.0.1] [--device cuda]
                            [--dtype float16] [--max-batch 16]
    python ddpo_sf.py --reward http://127.0.0.1:8085 ...

The protocol is in rewards/remote.py (JSON, images as base64 PNG). The server trusts nothing it receives: it
never unpickles or evaluates, it reads JSON and decodes 8-bit PNG with PIL after checking every image's header and
compressed data, and answers 400 with a message for anything malformed. It listens on 127.0.0.1 unless --host
says otherwise (there is no authentication).

Every request has a memory budget, checked before anything is decoded: its bytes (--max-request-mb), each image's
pixels (--max-pixels) and the pixels of all its images together (--max-request-pixels, by default --max-batch
images of 1024x1024): a request over one is answered 413. Images stay uint8 (3 bytes a pixel) until the reward
model scores them, one request at a time under a lock, in chunks of --max-batch images turned to float32 one
chunk at a time. At most --max-connections connections are served at once (more: 503 at once), each in its own
thread, and a connection silent for --timeout seconds is closed. Whatever fails while a request is read, parsed
or scored is answered: 400 (malformed), 413 (over a limit), 503 (out of memory, or busy), 500 (a bug), never a
dropped connection; the client retries 5xx only.
"""

import argparse
import base64
import binascii
import io
import ipaddress
import json
import math
import socket
import struct
import sys
import threading
import traceback
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from . import RewardError, load
from .remote import PROTOCOL_VERSION

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE_PIXELS = 1024 * 1024  # the largest image the scripts' Stable Diffusion models sample (512² or 768²)
MAX_SIDE = 65500  # libjpeg's largest width or height: the JPEG rewards cannot score a wider image
SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel of each PNG colour type (grey, RGB, palette, +alpha)
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400); its message goes back to the client."""

    status = 400


class TooLarge(BadRequest):
    """A request over one of the server's limits (HTTP 413)."""

    status = 413


def png_header(data: bytes, max_pixels: int, index: int) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk of PNG bytes, before any pixel is
    decoded; BadRequest unless it is an 8-bit PNG of at most `max_pixels` pixels and MAX_SIDE a side."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadRequest(f"image {index} is not a PNG")
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise BadRequest(f"image {index} is not a readable PNG (no IHDR chunk)")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour not in SAMPLES or interlace not in (0, 1) or not width or not height:
        raise BadRequest(f"image {index} is not a readable PNG (IHDR: {width}x{height}, colour type {colour})")
    if depth != 8:  # PIL clips 16-bit grey to white and reads 16-bit RGB's high byte: a wrong image, no error
        raise BadRequest(f"image {index} has {depth} bits per sample; only 8-bit PNG is accepted")
    if max(width, height) > MAX_SIDE:
        raise BadRequest(f"image {index} is {width}x{height}; at most {MAX_SIDE} pixels a side")
    if width * height > max_pixels:
        raise TooLarge(f"image {index} has {width}x{height} pixels, more than --max-pixels {max_pixels}")
    return width, height, depth, colour, interlace


def check_image_data(data: bytes, header: tuple[int, int, int, int, int], index: int) -> None:
    """BadRequest unless the IDAT chunks hold one complete zlib stream (its checksum verified) of exactly the bytes
    the header's size needs (PNG spec 7.2, 8.2). PIL fills a stream that ends early with zeros, without an error.
    Inflates in pieces and stops past the expected size, so a zip bomb costs no memory."""
    width, height, depth, colour, interlace = header
    bits = SAMPLES[colour] * depth
    expected = 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)  # pixels and rows of the pass, rounded up
        if w > 0 and h > 0:
            expected += h * (1 + (w * bits + 7) // 8)  # a filter byte, then the row's samples
    inflater, produced, position, piece = zlib.decompressobj(), 0, 8, 2**20
    try:
        while position + 12 <= len(data):
            length, kind = struct.unpack(">I4s", data[position : position + 8])
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                pending = data[position + 8 : position + 8 + length]
                while True:
                    out = len(inflater.decompress(pending, piece))
                    produced += out
                    if produced > expected:
                        raise BadRequest(f"image {index} has more pixel data than its {width}x{height} pixels")
                    pending = inflater.unconsumed_tail
                    if not pending and out < piece:  # all input consumed and no output held back
                        break
            position += 12 + length
    except zlib.error as e:
        raise BadRequest(f"image {index} is not a readable PNG (zlib: {e})") from None
    if produced < expected or not inflater.eof:
        raise BadRequest(f"image {index} is truncated: its pixel data ends after {produced} of {expected} bytes")


def decode_png(data: bytes, header: tuple[int, int, int, int, int], index: int, out: torch.Tensor) -> None:
    """Decode checked PNG bytes into `out`, uint8 [3,H,W]."""
    import numpy as np
    from PIL import Image

    check_image_data(data, header, index)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            out.permute(1, 2, 0).numpy()[...] = np.asarray(image.convert("RGB"))  # HWC into CHW, one copy
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's ways of saying "broken"
        raise BadRequest(f"image {index} is not a readable PNG ({type(e).__name__}: {e})") from None


def parse_request(body: bytes, max_pixels: int, max_request_pixels: int) -> tuple[list[str], torch.Tensor]:
    """The prompts and images (uint8 [B,3,H,W]) of a /score request body, or BadRequest saying what is wrong.
    Every header is checked, and the request's pixels counted, before the first image is decoded."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past Python's recursion limit
        raise BadRequest("the body is not JSON (or is nested too deeply)") from None
    if not isinstance(request, dict):
        raise BadRequest('expected a JSON object {"prompts": [...], "images": [...]}')
    prompts, images = request.get("prompts"), request.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings')
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest('"images" must be a list of base64 PNG strings')
    if not images or len(images) != len(prompts):
        raise BadRequest(f"expected as many prompts as images, at least one; got {len(prompts)} and {len(images)}")
    pngs, headers = [], []
    for index, text in enumerate(images):
        try:
            pngs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"image {index} is not base64") from None
        headers.append(png_header(pngs[-1], max_pixels, index))
    width, height = headers[0][:2]
    if any(header[:2] != (width, height) for header in headers):
        raise BadRequest("the images of one request must all have the same size")
    if len(pngs) * width * height > max_request_pixels:
        raise TooLarge(f"the request's {len(pngs)} images of {width}x{height} have {len(pngs) * width * height} "
                       f"pixels, more than --max-request-pixels {max_request_pixels}; send fewer at once")
    decoded = torch.empty(len(pngs), 3, height, width, dtype=torch.uint8)  # filled in place: no second copy
    for index, (data, header) in enumerate(zip(pngs, headers)):
        decode_png(data, header, index, decoded[index])
    return prompts, decoded


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (Python's, torch's CPU allocator's or CUDA's)."""
    return isinstance(error, MemoryError) or isinstance(error, RuntimeError) and (
        "out of memory" in str(error) or "can't allocate memory" in str(error))


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one loaded reward; `score` runs under a lock (one model, many client threads).

    Defaults: `max_request_pixels` is `max_batch` images of min(`max_pixels`, 1024²); `max_request_bytes` what
    such a request takes as base64 PNG that did not compress (4 bytes a pixel, +1%), plus 1 MiB for the prompts."""

    daemon_threads = True
    block_on_close = False  # a client that holds its connection open must not hold up the server's exit

    def __init__(self, address, reward, spec: str, max_batch: int = 16, max_pixels: int = 4096 * 4096,
                 max_request_bytes: int | None = None, max_request_pixels: int | None = None,
                 max_connections: int = 8, timeout: float = 60.0):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # before the socket is made
        super().__init__(address, _Handler)
        self.reward, self.spec, self.max_batch, self.max_pixels = reward, spec, max_batch, max_pixels
        if max_request_pixels is None:
            max_request_pixels = max_batch * min(max_pixels, REFERENCE_PIXELS)
        if max_request_bytes is None:
            max_request_bytes = int(4.04 * max_request_pixels) + 2**20
        self.max_request_pixels, self.max_request_bytes = max_request_pixels, max_request_bytes
        self.max_connections, self.connection_timeout = max_connections, timeout
        self.device = next((t.device for t in [*reward.parameters(), *reward.buffers()]), torch.device("cpu"))
        self.lock = threading.Lock()
        self.connections = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        """Serve the connection in a thread of its own if fewer than max_connections are served; else 503 now."""
        if self.connections.acquire(blocking=False):
            try:
                return super().process_request(request, client_address)
            except BaseException:  # no thread started (none left to the process): nothing will release the slot
                self.connections.release()
                raise
        body = json.dumps({"error": f"the server is busy: {self.max_connections} connections are open "
                                   "(--max-connections); try again"}).encode()
        try:
            request.settimeout(1)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def info(self) -> dict:
        return {"reward": self.spec, "differentiable": False, "version": PROTOCOL_VERSION,
                "max_pixels": self.max_pixels, "max_request_pixels": self.max_request_pixels,
                "max_request_bytes": self.max_request_bytes}

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float | None]:
        """Scores of uint8 images [B,3,H,W]; only one chunk of --max-batch images is float at a time."""
        chunks = [slice(i, i + self.max_batch) for i in range(0, len(prompts), self.max_batch)]
        with self.lock, torch.no_grad():
            scores = torch.cat([self.reward(images[c].to(self.device).float().div_(255), prompts[c]).float().cpu()
                                for c in chunks])
        return [s if math.isfinite(s) else None for s in scores.tolist()]  # JSON has no NaN: null


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"  # keep-alive: a training run sends one request per reward call

    def setup(self):
        self.timeout = self.server.connection_timeout  # idle between requests or stalled in one; the client reconnects
        super().setup()

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
        self._send(200, self.server.info())

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
            return self._send(413, {"error": f"request of {length} bytes exceeds the server's limit of "
                                             f"{self.server.max_request_bytes} (--max-request-mb)"})
        answer = self._answer(length)
        if answer is not None:
            self._send(*answer)

    def _answer(self, length: int) -> tuple[int, dict] | None:
        """(status, answer) to the request body of `length` bytes; None when the client has gone."""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return 408, {"error": f"the body did not arrive ({self.timeout:g} s without data)"}
        except OSError:  # reset by the client
            self.close_connection = True
            return None
        except MemoryError:
            self.close_connection = True  # the rest of the body is unread
            return 503, {"error": f"the server ran out of memory reading a body of {length} bytes; try again"}
        if len(body) < length:  # the client closed the connection: nobody to answer
            self.close_connection = True
            return None
        stage = "reading the request"
        try:
            prompts, images = parse_request(body, self.server.max_pixels, self.server.max_request_pixels)
            del body  # the only reference: the JSON text is not held while the reward scores
            stage = "scoring"
            return 200, {"scores": self.server.score(images, prompts)}
        except BadRequest as e:
            return e.status, {"error": str(e)}
        except (RewardError, ValueError) as e:  # the reward refuses this input (e.g. a prompt outside its grammar)
            if stage == "scoring":
                return 400, {"error": f"the reward refused the request: {' '.join(str(e).split())}"}
            error = e
        except Exception as e:  # noqa: BLE001 - a bug or an out-of-memory: answered, and the server lives on
            error = e
        traceback.print_exception(error)
        message = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        if out_of_memory(error):  # maybe only for now (other requests hold the memory): the client retries 5xx
            return 503, {"error": f"the server ran out of memory {stage} ({message}); try again, or send fewer "
                                  "images at once"}
        return 500, {"error": f"{stage} failed: {message}"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> None:
    parser = _Parser(prog="python -m rewards.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", required=True, help="reward spec, as the scripts' --reward (e.g. llava_bertscore)")
    parser.add_argument("--port", type=int, default=8085, help="port to listen on; 0 picks a free one (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; not loopback: reachable by others")
    parser.add_argument("--device", default="auto", help="torch device of the reward; auto: cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, else fp32")
    parser.add_argument("--max-batch", type=int, default=16, help="images scored at once (DDPO's LLaVA client: 16)")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image accepted, in pixels")
    parser.add_argument("--max-request-pixels", type=int, default=None,
                        help="most pixels of all images of one request (default: --max-batch images of 1024x1024)")
    parser.add_argument("--max-request-mb", type=float, default=None,
                        help="largest request accepted, in MiB (default: what --max-request-pixels need as PNG)")
    parser.add_argument("--max-connections", type=int, default=8, help="connections served at once; more get 503")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a connection may stay silent")
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_pixels", "max_request_pixels", "max_request_mb", "max_connections", "timeout"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        reward = load(args.reward, device=device, dtype=dtype)
        server = RewardServer((args.host, args.port), reward, args.reward, args.max_batch, args.max_pixels,
                              None if args.max_request_mb is None else max(1, int(args.max_request_mb * 2**20)),
                              args.max_request_pixels,
                              args.max_connections, args.timeout)
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
    print(f"rewards.serve: serving {args.reward!r} on http://{host}:{port} ({device}, {dtype}; a request: at most "
          f"{server.max_request_pixels} pixels, {server.max_request_bytes / 2**20:.1f} MiB)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
