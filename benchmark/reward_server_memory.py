"""Peak memory of the reward server answering one abusive request: N all-zero PNGs of SIZE² pixels (a 4096² one
is 49 KB on the wire and 50 MB as uint8, 201 MB as float32). Issue 21 measured 8 × 4096² at 5.1 GB RSS.

    python benchmark/reward_server_memory.py                         # 8 × 4096², the server's default limits
    python benchmark/reward_server_memory.py --root /tmp/old         # the same against another checkout
    python benchmark/reward_server_memory.py -- --max-batch 1 --max-request-pixels 134217728   # server flags

Starts `python -m rewards.serve --reward jpeg_compressibility` on 127.0.0.1 in a subprocess, posts the request
once (no retry) and prints the answer's status, the wall time and the server's peak RSS (VmHWM from /proc, so
Linux only) before and after the request. Heavy: the old server needs ~5 GB; run it alone, once.
"""

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to serve from")
    parser.add_argument("server_flags", nargs="*", help="after --: flags of python -m rewards.serve")
    args = parser.parse_args()
    import httpx2

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((args.size, args.size, 3), np.uint8)).save(buffer, format="PNG")  # 49 KB at 4096²
    png = base64.b64encode(buffer.getvalue()).decode()
    body = json.dumps({"prompts": ["a"] * args.images, "images": [png] * args.images}).encode()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", "jpeg_compressibility", "--port",
                               "0", *args.server_flags], cwd=args.root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if "serving" not in line:
            raise SystemExit("the server did not start")
        url = "http://127.0.0.1:" + line.split("http://")[1].split()[0].rsplit(":", 1)[1]
        before = peak_rss_mb(server.pid)
        t0 = time.perf_counter()
        try:
            with httpx2.Client(timeout=600, trust_env=False) as client:
                answer = client.post(url + "/score", content=body, headers={"Content-Type": "application/json"})
            outcome = f"HTTP {answer.status_code} {answer.text[:160]}"
        except httpx2.TransportError as e:
            outcome = f"no answer ({type(e).__name__}: {e})"
        seconds = time.perf_counter() - t0
        time.sleep(0.2)
        after = peak_rss_mb(server.pid) if server.poll() is None else float("nan")
    finally:
        server.kill()
        server.wait()
    print(f"{args.images} x {args.size}² zero PNGs, body {len(body) / 2**20:.2f} MiB, flags {args.server_flags}")
    print(f"answer: {outcome}")
    print(f"time {seconds:.1f} s; server peak RSS {before:.0f} MB at start, {after:.0f} MB after the request")


if __name__ == "__main__":
    main()
