"""The reward server (`python -m rewards.serve`) and its client (`rewards.remote`), on loopback only.

References are the in-process rewards on the same images (quantised to /255 first: PNG carries 8 bits), a fake
server that answers junk, and raw HTTP requests sent with httpx2."""

import base64
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from conftest import ROOT, read_metrics
from rewards.remote import RemoteReward, encode_png
from rewards.serve import RewardServer
from shapes import data

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def shapes_batch(n: int, seed: int):
    """Rendered shapes with their captions and with other captions (so exact match is both 0 and 1), on the
    8-bit grid so that the PNG round trip is exact."""
    images, attrs = data.sample_batch(n, np.random.default_rng(seed))
    prompts = [data.caption(a) for a in attrs[: n // 2]] + [data.caption(a) for a in attrs[n // 2 :][::-1]]
    return (images * 255).round() / 255, prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(spec: str, *args: str, port: int = 0):
    """`python -m rewards.serve` in a subprocess; returns (process, URL, the line it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", spec, "--port", str(port), *args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "... serving SPEC on http://host:port ..." or EOF if it died
    assert "serving" in line, proc.communicate()[1][-2000:]
    return proc, "http://127.0.0.1:" + line.split("http://")[1].split()[0].rsplit(":", 1)[1], line


def stop(proc) -> str:
    proc.kill()
    return proc.communicate()[1]


def test_scores_over_http_equal_in_process_then_the_server_is_killed():
    spec = "jpeg_compressibility,shapes_exact_match:10"
    images, prompts = shapes_batch(10, seed=3)
    proc, url, _ = start_cli_server(spec, "--host", "0.0.0.0", "--max-batch", "3")  # 10 images: chunks of 3
    try:
        remote, local = rewards.load(url), rewards.load(spec)
        assert remote.parts[url].served == spec and not remote.differentiable
        assert torch.equal(remote(images, prompts), local(images, prompts))
        exact = local.last_components["shapes_exact_match"]
        assert 0 < exact.sum() < len(prompts)  # both outcomes occur: the comparison is not vacuous
        impatient = RemoteReward(url, timeout=2, retries=1, backoff=0.05)
        assert torch.equal(impatient(images, prompts), remote(images, prompts))
    finally:
        stderr = stop(proc)
    assert "warning: listening on 0.0.0.0, not loopback" in stderr
    t0 = time.time()
    with pytest.raises(rewards.RewardError) as info:
        impatient(images, prompts)
    assert time.time() - t0 < 10
    message = str(info.value)
    assert "\n" not in message and f"reward server {url} did not answer POST /score after 2 attempt(s)" in message
    assert f"python -m rewards.serve --reward SPEC --port {url.rsplit(':', 1)[1]}" in message


def test_absent_server_fails_at_load_with_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    with pytest.raises(rewards.RewardError) as info:
        rewards.load(f"remote[url={url};retries=1;timeout=2]:0.5")
    assert time.time() - t0 < 10
    message = str(info.value)
    assert "\n" not in message and f"reward server {url} did not answer GET /info after 2 attempt(s)" in message
    assert "ConnectError" in message and "start one with `python -m rewards.serve" in message


def test_two_clients_at_once(serve_in_thread):
    url = serve_in_thread("jpeg_compressibility")
    local = rewards.load("jpeg_compressibility")
    batches = [shapes_batch(6, seed) for seed in (10, 11)]
    results, errors = {}, []

    def client(i):
        try:
            remote = RemoteReward(url)
            results[i] = [remote(*batches[i]) for _ in range(4)]
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, (images, prompts) in enumerate(batches):
        expected = local(images, prompts)
        assert all(torch.equal(scores, expected) for scores in results[i])
    assert not torch.equal(*(local(*b) for b in batches))  # the two clients' answers differ


# ---------------------------------------------------------------------------------------------- a junk server
class _FakeHandler(BaseHTTPRequestHandler):
    """Answers each path with the (status, body) in server.answers and counts the requests."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer()

    def _answer(self):
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        status, body = self.server.answers[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    server.daemon_threads = True
    server.hits = {}
    server.answers = {"/info": (200, json.dumps({"reward": "fake", "differentiable": False, "version": 1}).encode())}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<html>busy</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (json.dumps({"scores": [1.0]}).encode(), "1 scores for 2 images"),
        (json.dumps({"scores": ["1", "2"]}).encode(), "a score that is not a number"),
        (json.dumps({"scores": [True, 1]}).encode(), "a score that is not a number"),
        (json.dumps({"result": [1, 2]}).encode(), "no list of scores"),
        (json.dumps([1, 2]).encode(), "no list of scores"),
        (b'{"scores": [1, 1' + b"0" * 400 + b"]}", "a score out of range"),
    ],
)
def test_malformed_answer_is_refused(fake_server, capsys, body, reason):
    server, url = fake_server
    server.answers["/score"] = (200, body)
    remote = RemoteReward(url, retries=0)
    scores = remote(*shapes_batch(2, 0))
    assert scores.shape == (2,) and torch.isnan(scores).all()  # never a score: the update is skipped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and reason in err[0] and url in err[0], err


def test_nan_passes_through_and_failures_are_retried_or_refused(fake_server, capsys):
    server, url = fake_server
    server.answers["/score"] = (200, json.dumps({"scores": [None, 2.5]}).encode())
    remote = RemoteReward(url, retries=2, backoff=0.01)
    scores = remote(*shapes_batch(2, 0))
    assert torch.isnan(scores[0]) and scores[1] == 2.5 and not capsys.readouterr().err

    server.answers["/score"] = (500, b'{"error": "scoring failed: CUDA out of memory"}')
    with pytest.raises(rewards.RewardError, match=r"after 3 attempt\(s\) \(HTTP 500: .*CUDA out of memory"):
        remote(*shapes_batch(2, 0))
    assert server.hits["/score"] == 1 + 3  # the first call, then 1 + 2 retries

    server.answers["/score"] = (400, b'{"error": "image 0 has 4096x4096 pixels"}')
    with pytest.raises(rewards.RewardError, match="refused POST /score with HTTP 400: .*4096x4096"):
        remote(*shapes_batch(2, 0))
    assert server.hits["/score"] == 4 + 1  # a refused request is not sent again

    server.answers["/info"] = (200, b'{"hello": 1}')
    with pytest.raises(rewards.RewardError, match="did not answer as a reward server of protocol version 1"):
        RemoteReward(url)


# ---------------------------------------------------------------------------------------------- what the server refuses
def png_base64(height: int, width: int) -> str:
    return encode_png(np.zeros((height, width, 3), dtype=np.uint8))


def test_server_refuses_malformed_requests(serve_in_thread):
    import httpx2

    url = serve_in_thread("shapes_exact_match", max_pixels=32 * 32, max_request_bytes=2**16) + "/score"
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    png = base64.b64decode(png_base64(8, 8))
    ok = {"prompts": ["a red circle on a white background"], "images": [png_base64(32, 32)]}
    refused = [  # (body, message); 400 unless the message is in TOO_LARGE
        (b"{not json", "the body is not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        ({"prompts": ["a"], "images": [base64.b64encode(jpeg.getvalue()).decode()]}, "image 0 is not a PNG"),
        ({"prompts": ["a"], "images": ["%%%not base64"]}, "image 0 is not base64"),
        ({"prompts": ["a"], "images": [base64.b64encode(png[:40]).decode()]}, "image 0 is truncated"),
        ({"prompts": ["a"], "images": [base64.b64encode(png[:20]).decode()]}, "image 0 is not a readable PNG"),
        ({"prompts": ["a"], "images": [png_base64(33, 32)]}, "image 0 has 32x33 pixels, more than --max-pixels 1024"),
        ({"prompts": ["a", "b"], "images": [png_base64(8, 8)]}, "as many prompts as images"),
        ({"prompts": [], "images": []}, "at least one"),
        ({"prompts": [1], "images": [png_base64(8, 8)]}, '"prompts" must be a list of strings'),
        ({"prompts": ["a", "b"], "images": [png_base64(8, 8), png_base64(8, 9)]}, "all have the same size"),
        ({"prompts": ["a photo of a cat"], "images": [png_base64(8, 8)]}, "the reward refused the request"),
        (b" " * (2**16 + 1), "exceeds the server's limit of 65536"),
    ]
    with httpx2.Client(trust_env=False) as client:
        for body, message in refused:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            answer = client.post(url, **kwargs)
            status = 413 if "more than --max-pixels" in message or "exceeds the server's limit" in message else 400
            assert answer.status_code == status and message in answer.json()["error"], (message, answer.text)
        answer = client.post(url, json=ok)  # the server is still up and scores a good request
        assert answer.status_code == 200 and answer.json()["scores"] in ([0.0], [1.0])
        assert client.get(url.replace("/score", "/info")).json() == {
            "reward": "shapes_exact_match", "differentiable": False, "version": 1, "max_pixels": 32 * 32,
            "max_request_pixels": 16 * 32 * 32, "max_request_bytes": 2**16,  # the default: --max-batch 16 images
        }
    with pytest.raises(rewards.RewardError, match="refused POST /score with HTTP 413: .*more than --max-pixels"):
        RemoteReward(url.replace("/score", ""))(torch.rand(1, 3, 40, 40), ok["prompts"])


def test_serve_cli_errors_are_one_line(capsys):
    from rewards.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--reward", "hpsv3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "unknown reward 'hpsv3'" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["--reward", "jpeg_compressibility", "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err


# ---------------------------------------------------------------------------------------------- limits under abuse
def raw_png(width: int, height: int, depth: int, colour: int, scanlines: bytes, interlace: int = 0) -> bytes:
    """A PNG written by hand (PIL writes neither 16-bit RGB, nor Adam7, nor a wrong amount of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def post(client, url: str, pngs: list[bytes], prompt: str = "a"):
    images = [base64.b64encode(png).decode() for png in pngs]
    return client.post(url + "/score", json={"prompts": [prompt] * len(images), "images": images})


def test_png_that_pil_would_misread_is_refused_and_adam7_is_read_right(serve_in_thread):
    """A 16-bit PNG (PIL clips grey to white, keeps RGB's high byte) and a zlib stream that ends early (PIL fills
    the rest with zeros) were scored as the wrong image; they are 400 now, and so is an image wider than any
    reward here takes (the JPEG rewards failed on it with a 500 that the client retried) and nested JSON (a
    RecursionError that dropped the connection). An interlaced PNG decodes to the pixels PIL reads."""
    import httpx2

    url = serve_in_thread("jpeg_compressibility")
    row16 = lambda *sample: b"\x00" + struct.pack(f">{len(sample)}H", *sample) * 4  # noqa: E731 - a filter byte, 4 px
    row8 = b"\x00" + b"\x80" * 12
    refused = [
        (raw_png(4, 2, 16, 0, row16(32768) * 2), "image 0 has 16 bits per sample; only 8-bit PNG is accepted"),
        (raw_png(4, 2, 16, 2, row16(32768, 1000, 65535) * 2), "image 0 has 16 bits per sample"),
        (raw_png(4, 2, 8, 2, row8), "image 0 is truncated: its pixel data ends after 13 of 26 bytes"),
        (raw_png(4, 2, 8, 2, row8 * 3), "image 0 has more pixel data than its 4x2 pixels"),
        (base64.b64decode(png_base64(1, 65501)), "image 0 is 65501x1; at most 65500 pixels a side"),
    ]
    with httpx2.Client(trust_env=False) as client:
        for png, message in refused:
            answer = post(client, url, [png])
            assert answer.status_code == 400 and message in answer.json()["error"], (message, answer.text)
        answer = client.post(url + "/score", content=b"[" * 60_000)
        assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]

        pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # 7 wide, 5 high
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        adam7 = b"".join(b"\x00" + pixels[y, x0::dx].tobytes() for x0, y0, dx, dy in passes for y in range(y0, 5, dy)
                         if x0 < 7)
        interlaced = raw_png(7, 5, 8, 2, adam7, interlace=1)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(interlaced)).convert("RGB")), pixels)  # PIL agrees
        plain = base64.b64decode(encode_png(pixels))
        answers = [post(client, url, [png]) for png in (interlaced, plain)]
        assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()


def test_pixels_per_request_are_capped_before_decoding_and_the_client_splits(serve_in_thread):
    """--max-request-pixels (here 3 images of 16x16) is checked on the PNG headers, before any image is decoded:
    a request over it is 413 even when its first image's data is broken. RemoteReward reads the limit from /info
    and sends a larger batch as several requests, scoring as in-process; one image over it stops with the 413."""
    import httpx2

    url = serve_in_thread("jpeg_compressibility", max_request_pixels=3 * 16 * 16)
    good, broken = base64.b64decode(png_base64(16, 16)), raw_png(16, 16, 8, 2, b"\x00" * 49)  # one row of 16
    with httpx2.Client(trust_env=False) as client:
        answer = post(client, url, [broken, good, good, good])
        assert answer.status_code == 413, answer.text
        assert "4 images of 16x16 have 1024 pixels, more than --max-request-pixels 768" in answer.json()["error"]
        assert post(client, url, [broken, good, good]).status_code == 400  # within the cap: decoded, refused
        assert post(client, url, [good, good, good]).status_code == 200
    images, prompts = shapes_batch(8, seed=5)
    images = torch.nn.functional.interpolate(images, size=(16, 16)).mul(255).round().div(255)  # 16x16 on the grid
    assert torch.equal(rewards.load(url)(images, prompts), rewards.load("jpeg_compressibility")(images, prompts))
    with pytest.raises(rewards.RewardError, match=r"refused POST /score with HTTP 413: .*more than --max-request-pix"):
        RemoteReward(url)(torch.rand(1, 3, 28, 28), ["a"])


def test_a_failure_while_parsing_or_scoring_is_answered_not_dropped(serve_in_thread, monkeypatch):
    """Out of memory (Python's MemoryError, torch's allocator) is 503, any other failure 500, in parsing as in
    scoring; the connection stays usable. Before, a failure while parsing dropped the connection unanswered and the
    client sent the request again."""
    import httpx2

    import rewards.serve as serve

    url = serve_in_thread("jpeg_compressibility")
    png = base64.b64decode(png_base64(8, 8))
    failures = [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3 GB"),
                KeyError("bug")]
    with httpx2.Client(trust_env=False) as client:
        for where in ("parse_request", "score"):
            for failure in failures:
                def fail(*args, failure=failure):
                    raise failure

                with monkeypatch.context() as patch:
                    if where == "score":
                        patch.setattr(serve.RewardServer, "score", fail)
                    else:
                        patch.setattr(serve, "parse_request", fail)
                    answer = post(client, url, [png])
                expected = 500 if isinstance(failure, KeyError) else 503
                assert answer.status_code == expected and type(failure).__name__ in answer.json()["error"], \
                    (where, failure, answer.text)
        assert post(client, url, [png]).status_code == 200  # the same connection, served again


PEAK = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import rewards
from rewards.remote import encode_png
from rewards.serve import RewardServer, parse_request

n, side = 32, 512
server = RewardServer(("127.0.0.1", 0), rewards.load("jpeg_compressibility"), "jpeg", max_batch=1)
png = encode_png(np.zeros((side, side, 3), np.uint8))
server.score(*parse_request(json.dumps({"images": [png], "prompts": ["a"]}).encode(), side**2, side**2)[::-1])
body = json.dumps({"prompts": ["a"] * n, "images": [png] * n}).encode()

def growth(key="VmHWM"):  # bytes above the resident size at the last reset
    now = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))
    return now - base

def reset():
    global base
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = 0
    base = growth("VmRSS")

reset()
prompts, images = parse_request(body, side**2, n * side**2)
parsed = growth()
reset()
scores = server.score(images, prompts)
print(json.dumps({"parse": parsed, "score": growth(), "pixels": n * side**2, "scores": len(set(scores))}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_a_request_is_held_as_uint8_and_scored_one_chunk_at_a_time():
    """32 all-zero 512² PNGs (8.4 Mpx, 1 KB each on the wire), chunks of one image, in a fresh process (its main
    thread: glibc's per-thread arenas would add fragmentation): parsing raises the peak RSS by less than 4 bytes a
    pixel (uint8: 3; the decode buffers of one image of 32 are ~7/32), scoring by less than one float32 copy of the
    request (12 B/px; one chunk is 1/32 of it). Before, parsing made every image float32 and torch.stack copied
    them all (24 B/px)."""
    # glibc's mmap threshold fixed at its initial 128 KiB: by default it rises to the size of a freed mmapped block,
    # after which each chunk's float32 buffers come from the heap and may stay resident when freed, so the peak RSS
    # measured the allocator's retention (seen: 12.002 B/px in 1 run of 5) rather than what is alive at once
    env = dict(ENV, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", PEAK, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scores"] == 1  # 32 equal images, all scored
    assert result["parse"] < 4 * result["pixels"] and result["score"] < 12 * result["pixels"], result


def test_connections_are_limited_and_a_silent_one_is_closed(serve_in_thread, monkeypatch):
    """--max-connections 1: while one request is being scored, another connection is answered 503 at once (the
    client retries a 5xx); a connection silent for --timeout is closed, and a body that stalls is answered 408.
    Before, every connection got a thread of its own and could stall for an hour."""
    import httpx2

    entered, release, score = threading.Event(), threading.Event(), RewardServer.score

    def held_score(self, images, prompts):
        entered.set()
        release.wait(60)
        return score(self, images, prompts)

    def answer_to(connection) -> bytes:  # everything until the server closes (each recv waits at most 20 s)
        chunks = [connection.recv(4096)]
        while chunks[-1]:
            chunks.append(connection.recv(4096))
        return b"".join(chunks)

    def once_free(request: bytes) -> bytes:  # the answer to `request` on a new connection, once the slot is free
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
                connection.sendall(request)
                answer = answer_to(connection)
            if not answer.startswith(b"HTTP/1.1 503"):
                return answer
            time.sleep(0.05)
        raise AssertionError("the connection slot never came back")

    monkeypatch.setattr(RewardServer, "score", held_score)
    url = serve_in_thread("jpeg_compressibility", max_connections=1, timeout=1)
    port = int(url.rsplit(":", 1)[1])
    answers = []

    def first_client():
        with httpx2.Client(trust_env=False, timeout=60) as client:
            answers.append(post(client, url, [base64.b64decode(png_base64(8, 8))]))

    busy = threading.Thread(target=first_client)
    busy.start()
    assert entered.wait(60)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as second:
        answer = answer_to(second)
    release.set()
    busy.join(60)
    assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections" in answer, answer
    assert answers[0].status_code == 200
    assert once_free(b"") == b""  # silent for 1 s: closed by the server
    answer = once_free(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer, answer


def test_remote_retries_backoff_and_timeout_are_bounded(fake_server, monkeypatch):
    """remote[retries=…] at most 10, timeout at most a day (1e300 was an OverflowError traceback), and no wait
    between attempts longer than 30 s (retries=10 waited 512 s before the last)."""
    server, url = fake_server
    for option, message in (("retries=11", "option retries=11 must be at most 10"),
                            ("timeout=1e300", "option timeout=1e+300 must be at most 86400")):
        with pytest.raises(rewards.RewardSpecError, match=re.escape(message)):
            rewards.load(f"remote[url={url};{option}]")
    waits = []
    monkeypatch.setattr("rewards.remote.time.sleep", waits.append)
    server.answers["/score"] = (503, b'{"error": "the server is busy"}')
    remote = rewards.load(f"remote[url={url};retries=10]")
    with pytest.raises(rewards.RewardError, match=r"after 11 attempt\(s\) \(HTTP 503"):
        remote(*shapes_batch(2, 0))
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be 0-65535, got 70000"),
    (["--port", "x"], "argument --port: invalid int value: 'x'"),
    (["--max-request-mb", "nan"], "--max-request-mb must be a positive number, got nan"),
    (["--max-request-pixels", "0"], "--max-request-pixels must be a positive number, got 0"),
])
def test_serve_flag_errors_are_one_line(capsys, flags, message):
    from rewards.serve import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--reward", "jpeg_compressibility", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"python -m rewards.serve: error: {message}", err


# ---------------------------------------------------------------------------------------------- a training run
DYING_SERVER = """
import os, sys
import rewards
from rewards.serve import RewardServer

class DyingServer(RewardServer):  # crashes in the middle of the request after the first `lives` requests
    calls = 0

    def score(self, images, prompts):
        DyingServer.calls += 1
        if DyingServer.calls > int(sys.argv[2]):
            os._exit(1)
        return super().score(images, prompts)

server = DyingServer(("127.0.0.1", 0), rewards.load(sys.argv[1]), sys.argv[1])
print(f"serving on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""
DDPO = ["--model", "tiny-shapes", "--steps", "3", "--batch-size", "4", "--sample-batch-size", "4",
        "--train-batch-size", "4", "--num-inference-steps", "2", "--num-sample-images", "2", "--sample-every", "100",
        "--save-every", "1", "--seed", "1"]
REWARD = "jpeg_compressibility"


def test_ddpo_through_the_server_equals_in_process_and_survives_its_death(tmp_path):
    """ddpo_sf.py on tiny-shapes with a black-box reward in-process, and through a server that dies in the middle of
    the third update's request (after the step-0 grid and two updates): one error line, a checkpoint at step 2,
    and `--resume` against a new server on the same port finishes with the in-process run's rewards and grids.

    The reward is jpeg_compressibility: it quantises to 8 bits as the client does, and building it draws no random
    numbers. (shapes_exact_match would not do: building its classifier draws from torch's RNG after the script has
    seeded it, so the in-process run samples other images than the remote one.)"""
    local_dir, remote_dir = tmp_path / "local", tmp_path / "remote"
    local = subprocess.Popen([sys.executable, str(ROOT / "ddpo_sf.py"), *DDPO, "--reward", REWARD,
                              "--output-dir", str(local_dir)], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    dying = subprocess.Popen([sys.executable, "-c", DYING_SERVER, REWARD, "3"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = dying.stdout.readline()
        assert "serving on" in line
        url = line.split()[-1]
        spec = f"remote[url={url};retries=1;timeout=60]"
        died = subprocess.run([sys.executable, str(ROOT / "ddpo_sf.py"), *DDPO, "--reward", spec, "--output-dir",
                               str(remote_dir)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        dying.kill()
        dying.wait()
        _, local_err = local.communicate(timeout=300)
    assert local.returncode == 0, local_err[-3000:]
    error_lines = [line for line in died.stderr.splitlines() if "error" in line.lower()]
    assert died.returncode != 0 and "Traceback" not in died.stderr, died.stderr[-3000:]
    assert len(error_lines) == 1 and f"reward server {url} did not answer POST /score" in error_lines[0], error_lines
    assert json.loads((remote_dir / "args.json").read_text())["reward"] == spec  # options recorded with the run
    assert [r["step"] for r in read_metrics(remote_dir)] == [1, 2]
    assert (remote_dir / "checkpoints" / "step_2").is_dir()

    server, _, _ = start_cli_server(REWARD, port=int(url.rsplit(":", 1)[1]))
    try:
        resumed = subprocess.run([sys.executable, str(ROOT / "ddpo_sf.py"), "--resume", str(remote_dir)],
                                 cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        stop(server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    local_rows, remote_rows = read_metrics(local_dir), read_metrics(remote_dir)
    assert [r["step"] for r in remote_rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "reward_queries"):
        assert [r[key] for r in remote_rows] == [r[key] for r in local_rows], key
    assert len({r["reward_mean"] for r in local_rows}) == len(local_rows)  # the rewards move: not vacuous
    grids = [[json.loads(row) for row in (d / "eval.jsonl").read_text().splitlines()] for d in (local_dir, remote_dir)]
    assert grids[0] == grids[1] and len(grids[0]) == 2  # the step-0 and final sample grids scored alike
