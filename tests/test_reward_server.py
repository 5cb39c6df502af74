"""The reward server (`python -m rewards.serve`) and its client (`rewards.remote`), on loopback only.

References are the in-process rewards on the same images (quantised to /255 first: PNG carries 8 bits), a fake
server that answers junk, and raw HTTP requests sent with httpx2."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
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
    refused = [
        (b"{not json", "the body is not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        ({"prompts": ["a"], "images": [base64.b64encode(jpeg.getvalue()).decode()]}, "image 0 is not a PNG"),
        ({"prompts": ["a"], "images": ["%%%not base64"]}, "image 0 is not base64"),
        ({"prompts": ["a"], "images": [base64.b64encode(png[:40]).decode()]}, "image 0 is not a readable PNG"),
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
            assert answer.status_code == 400 and message in answer.json()["error"], (message, answer.text)
        answer = client.post(url, json=ok)  # the server is still up and scores a good request
        assert answer.status_code == 200 and answer.json()["scores"] in ([0.0], [1.0])
        assert client.get(url.replace("/score", "/info")).json() == {
            "reward": "shapes_exact_match", "differentiable": False, "version": 1
        }
    with pytest.raises(rewards.RewardError, match="refused POST /score with HTTP 400: .*more than --max-pixels"):
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
