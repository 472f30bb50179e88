"""serve.py over loopback: throughput against the in-process batched loop, latency by concurrency and worker count,
overload, and a soak with bad requests. Every phase is bounded in requests and seconds.

    python benchmarks/bench_serve.py                    # EfficientNet-Lite0 (ImageNet weights, offline), 224 px, ONNX
    python benchmarks/bench_serve.py --seconds 3 --soak 1000      # a quicker look
    python benchmarks/bench_serve.py --model model.onnx

The clients are asyncio connections in this process (HTTP/1.1 keep-alive, one image per request as a raw
image/jpeg body), so they cost little CPU beside the server; on a 2-core machine they still share the cores with
it. Targets (issue 20): 16 clients >= 85% of the in-process loop's images/s (inference.predict_onnx, batch 32,
same model and runtime); one client's median latency <= 1.3x one in-process prediction of one image (decode
included); 64 clients against --queue 16 get 503 + Retry-After within 1 s, none waits past 10 s, and the server
answers normally afterwards; a soak of --soak requests, 20% bad, gives no 5xx but 503, grows the server's resident
memory by <= 100 MB after warm-up, and leaves /readyz at 200.
"""
import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from common import ROOT, fmt, load_average, machine_lines, median, table

import export  # noqa: E402
import inference  # noqa: E402
from make_sample import png_declaring  # noqa: E402
from images import list_images  # noqa: E402
from onnx_model import OnnxModel  # noqa: E402

TOKEN = "bench-token"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help=".onnx (or .pth) to serve (default: EfficientNet-Lite0 with ImageNet weights at "
                                   "--image-size, its head untrained, flip TTA on as the default model has, exported)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", default=os.path.join(ROOT, "images"), help="folder of images the clients send")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each latency/throughput phase")
    p.add_argument("--max-requests", type=int, default=3000, help="requests per phase at most")
    p.add_argument("--soak", type=int, default=5000, help="requests of the soak")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels of the latency table")
    return p.parse_args(argv)


def make_model(folder, image_size):
    import torch

    from dataset import IMAGENET_MEAN, IMAGENET_STD
    from model import build_model, make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 4, "imagenet", image_size=image_size)
    pth = os.path.join(folder, "model.pth")
    facts = dict(backbone="efficientnet_lite0", attributes=["Attr1", "Attr2", "Attr3", "Attr4"], image_size=image_size,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, thresholds=[0.5] * 4, config={"unfreeze": "none"}, epoch=1,
                 tta=True)
    save_checkpoint(make_checkpoint(model, **facts), pth)
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main([pth, "--check-images", "2"]) == 0
    return os.path.join(folder, "model.onnx")


def in_process(model_path, paths):
    """(images/s of inference.predict_onnx over paths in batches of 32, best of 3; median seconds of one image)."""
    model = OnnxModel(model_path, device="cpu")
    tta = model.facts.get("tta", False)
    list(inference.predict_onnx(model, paths[:32], 32, tta))  # warm-up
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        n = sum(1 for _ in inference.predict_onnx(model, paths, 32, tta))
        rates.append(n / (time.perf_counter() - started))
    one = []
    for path in paths[:40]:
        started = time.perf_counter()
        list(inference.predict_onnx(model, [path], 1, tta))
        one.append(time.perf_counter() - started)
    return max(rates), median(one)


class Server:
    def __init__(self, model, *flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model", model, "--port",
                                         str(self.port), "--device", "cpu", *flags], cwd=ROOT, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"serve.py ended: {self.log.read()}")
            with contextlib.suppress(OSError):
                if self.get("/readyz") == 200:
                    return
            time.sleep(0.2)
        raise SystemExit("serve.py did not become ready in 120 s")

    def get(self, path):
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    def rss_mb(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None


def request_bytes(body, content_type="image/jpeg", token=None, length=None):
    head = (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n")
    head += f"Authorization: Bearer {token}\r\n" if token else ""
    return head.encode() + b"\r\n" + body


async def read_response(reader):
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers


async def load(port, clients, requests, *, total, seconds, timeout=30.0):
    """clients connections, each sending the next of requests() until total requests or seconds have passed.
    Returns [(status, seconds, headers)]; a request unanswered after timeout counts as status 0."""
    results, deadline = [], time.perf_counter() + seconds
    sent = 0

    async def client():
        nonlocal sent
        reader = writer = None
        while sent < total and time.perf_counter() < deadline:
            sent += 1
            data = requests()
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.perf_counter()
            try:
                writer.write(data)
                status, headers = await asyncio.wait_for(read_response(reader), timeout)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, TimeoutError):
                status, headers = 0, {}
            results.append((status, time.perf_counter() - started, headers))
            if status == 0 or headers.get("connection") == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def latency_rows(model, bodies, args, workers):
    server = Server(model, "--workers", str(workers), "--queue", "256")
    rows, rate16 = [], None
    try:
        cycle = iter(range(10**9))
        good = lambda: request_bytes(bodies[next(cycle) % len(bodies)])  # noqa: E731
        asyncio.run(load(server.port, 4, good, total=64, seconds=30))  # warm-up
        for clients in [int(c) for c in args.clients.split(",")]:
            started = time.perf_counter()
            results = asyncio.run(load(server.port, clients, good, total=args.max_requests, seconds=args.seconds))
            elapsed = time.perf_counter() - started
            ok = [t for status, t, _ in results if status == 200]
            rate = len(ok) / elapsed
            rate16 = rate if clients == 16 else rate16
            rows.append([f"{workers}", f"{clients}", f"{len(results)}", f"{len(results) - len(ok)}", fmt(rate),
                         fmt(1000 * percentile(ok, 50)), fmt(1000 * percentile(ok, 95)),
                         fmt(1000 * percentile(ok, 99))])
    finally:
        code = server.stop()
    return rows, rate16, code




def overload(model, bodies):
    """64 clients against --queue 16 for 5 s, then one client: statuses, the slowest 503, the slowest of all."""
    server = Server(model, "--queue", "16")
    try:
        cycle = iter(range(10**9))
        good = lambda: request_bytes(bodies[next(cycle) % len(bodies)])  # noqa: E731
        results = asyncio.run(load(server.port, 64, good, total=5000, seconds=5, timeout=10))
        after = asyncio.run(load(server.port, 1, good, total=20, seconds=30))
        ready = server.get("/readyz")
    finally:
        code = server.stop()
    refused = [(t, h) for s, t, h in results if s == 503]
    return {"requests": len(results), "200": sum(s == 200 for s, _, _ in results), "503": len(refused),
            "other": sum(s not in (200, 503) for s, _, _ in results),
            "retry_after": all(h.get("retry-after") == "1" for _, h in refused),
            "slowest_503": max((t for t, _ in refused), default=0.0), "slowest": max(t for _, t, _ in results),
            "after_ok": sum(s == 200 for s, _, _ in after), "after": len(after), "ready": ready, "exit": code}


def soak(model, bodies, n):
    """n requests from 16 clients, 20% bad; RSS after the first 10% (warm-up) and at the end."""
    server = Server(model, "--token", TOKEN, "--max-body", "1000000")
    rng = random.Random(0)
    bad = [
        lambda b: request_bytes(b"this is not an image", token=TOKEN),
        lambda b: request_bytes(b[:len(b) // 2], token=TOKEN),  # truncated
        lambda b: request_bytes(png_declaring(100_000, 100_000), "image/png", token=TOKEN),
        lambda b: request_bytes(b"", token=TOKEN, length=5_000_000),  # oversized: refused on its Content-Length
        lambda b: request_bytes(b, "text/plain", token=TOKEN),
        lambda b: request_bytes(b),  # no token
    ]

    def mixed():
        body = rng.choice(bodies)
        return rng.choice(bad)(body) if rng.random() < 0.2 else request_bytes(body, token=TOKEN)

    try:
        warm = asyncio.run(load(server.port, 16, mixed, total=max(n // 10, 200), seconds=600))
        rss_warm = server.rss_mb()
        rest = asyncio.run(load(server.port, 16, mixed, total=n - len(warm), seconds=900))
        rss_end = server.rss_mb()
        ready = server.get("/readyz")
    finally:
        code = server.stop()
    statuses = {}
    for s, _, _ in warm + rest:
        statuses[s] = statuses.get(s, 0) + 1
    return {"requests": len(warm + rest), "statuses": dict(sorted(statuses.items())), "rss_warm": rss_warm,
            "rss_end": rss_end, "ready": ready, "exit": code}


def main(argv=None):
    args = parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench_serve_")
    model = args.model or make_model(folder, args.image_size)
    paths = list_images(args.images)
    bodies = [open(p, "rb").read() for p in paths]
    print("\n".join(machine_lines()))
    facts = OnnxModel(model).facts if model.endswith(".onnx") else {}
    print(f"model     {os.path.basename(model)}: {facts.get('backbone')} at {facts.get('image_size')} px, "
          f"flip TTA {facts.get('tta')}, ONNX Runtime; {len(paths)} images of {args.images} sent as image/jpeg")
    rate, one = in_process(model, paths)
    print(f"in-process: inference.predict_onnx batch 32 {rate:.1f} images/s; one image (decode included) "
          f"median {1000 * one:.1f} ms\n", flush=True)
    rows, rate16, codes = [], {}, {}
    for workers in (1, 2):
        r, rate16[workers], codes[workers] = latency_rows(model, bodies, args, workers)
        rows += r
    print(table(["workers", "clients", "requests", "not 200", "images/s", "p50 ms", "p95 ms", "p99 ms"], rows))
    single = float([r for r in rows if r[0] == "1" and r[1] == "1"][0][5]) / 1000
    over = overload(model, bodies)
    print(f"\noverload  64 clients, --queue 16, 5 s: {over['requests']} requests, {over['200']} 200, "
          f"{over['503']} 503 (Retry-After on all: {over['retry_after']}), {over['other']} other; slowest 503 "
          f"{over['slowest_503']:.3f} s, slowest request {over['slowest']:.2f} s; afterwards one client "
          f"{over['after_ok']}/{over['after']} 200, /readyz {over['ready']}; exit {over['exit']}")
    s = soak(model, bodies, args.soak)
    print(f"soak      {s['requests']} requests, 16 clients, 20% bad: statuses {json.dumps(s['statuses'])}; server "
          f"RSS {s['rss_warm']:.0f} MB after warm-up, {s['rss_end']:.0f} MB at the end; /readyz {s['ready']}; "
          f"exit {s['exit']}")
    fivexx = sum(n for status, n in s["statuses"].items() if status >= 500 and status != 503 or status == 0)
    checks = [
        (rate16[1] >= 0.85 * rate, f"16 clients, 1 worker >= 85% of the in-process loop: {rate16[1]:.1f} / "
                                   f"{rate:.1f} = {100 * rate16[1] / rate:.0f}%"),
        (single <= 1.3 * one, f"one client's median <= 1.3x one in-process image: {1000 * single:.1f} / "
                              f"{1000 * one:.1f} ms = {single / one:.2f}x"),
        (over["503"] > 0 and over["retry_after"] and over["slowest_503"] <= 1 and over["slowest"] <= 10
         and over["after_ok"] == over["after"] and over["ready"] == 200,
         f"overload: 503 + Retry-After within 1 s ({over['slowest_503']:.3f} s), none past 10 s "
         f"({over['slowest']:.2f} s), recovered ({over['after_ok']}/{over['after']})"),
        (fivexx == 0 and s["rss_end"] - s["rss_warm"] <= 100 and s["ready"] == 200,
         f"soak: no 5xx but 503 ({fivexx}), RSS growth {s['rss_end'] - s['rss_warm']:+.0f} MB <= 100, "
         f"/readyz {s['ready']}"),
        (all(c == 0 for c in [*codes.values(), over["exit"], s["exit"]]), "every server exited 0 on SIGTERM"),
    ]
    print("\ntargets")
    for ok, text in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {text}")
    print(f"load avg  {load_average()} at the end")


if __name__ == "__main__":
    main()
