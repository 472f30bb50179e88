"""serve.py against the real server: uvicorn in a subprocess on a free loopback port, the sample's images posted
over HTTP and compared with `inference.py --json`; every error status, the token, the limits, SIGTERM with requests
in flight; the page in headless Chromium (Playwright with Debian's chromium, no browser download)."""
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

import inference
import serve
from conftest import ROOT, ServerProcess
from make_sample import png_declaring

SAMPLE = [os.path.join(ROOT, "images", f"img_{i:04d}.jpg") for i in range(1, 7)]
TOKEN = "s3cret-token"
BLOCK_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = None; "  # as if not installed


class Server(ServerProcess):
    """python serve.py ... in a subprocess; .url, .stop() (SIGTERM) -> exit code, .log() its output."""

    def __init__(self, tmp, model, *flags, env=None, torch=True):
        code = ("" if torch else BLOCK_TORCH) + "import sys, serve; sys.exit(serve.main(sys.argv[1:]))"
        super().__init__(["-c", code, "--model", model, "--device", "cpu", *flags], folder=tmp, name="serve",
                         ready="/healthz", env=env)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An EfficientNet-Lite0 checkpoint with ImageNet features (offline; its outputs differ between images) at
    64 px, calibrated, Attr3 not learnt (its probability the constant 0.2), and its export: {"pth", "onnx",
    "root"}."""
    import export
    from conftest import write_checkpoint

    root = tmp_path_factory.mktemp("serve")
    pth = write_checkpoint(root / "model.pth", "efficientnet_lite0", image_size=64, weights="imagenet",
                           calibration={"slope": [0.8, 1.2, 0.0, 1.0], "intercept": [0.1, -0.2, -1.3862944, 0.0]},
                           learnt=[True, True, False, True], p_values=[1e-8, 1e-5, 0.7, 1e-3])
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main([pth, "--check-images", "2"]) == 0
    return {"pth": pth, "onnx": str(root / "model.onnx"), "root": str(root)}


@pytest.fixture(scope="module")
def onnx_server(models):
    """The .onnx model where torch cannot be imported, behind a token, with small limits."""
    server = Server(models["root"], models["onnx"], "--max-files", "4", "--max-body", "200000", "--queue", "6",
                    env={serve.TOKEN_ENV: TOKEN}, torch=False)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def pth_server(models):
    server = Server(models["root"], models["pth"])
    yield server
    assert server.stop() == 0, server.log()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(server, files, headers=AUTH, path="/predict", **kw):
    """files: [(name, bytes)] as multipart parts named file."""
    return httpx.post(server.url + path, files=[("file", (name, data)) for name, data in files], headers=headers,
                      timeout=60, **kw)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def inference_json(model, paths):
    """inference.py --json's records, keyed by file name."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        inference.main([*paths, "--model", model, "--json", "--device", "cpu", "--num-workers", "0"])
    return {os.path.basename(r["image"]): r for r in map(json.loads, out.getvalue().splitlines())}


def assert_same(served, expected):
    assert set(served) == set(expected) and served["present"] == expected["present"]
    assert served["thresholds"] == expected["thresholds"]
    for a, p in expected["probabilities"].items():
        assert abs(served["probabilities"][a] - p) <= 1e-5, (a, served, expected)


@pytest.mark.parametrize("kind", ["onnx", "pth"])
def test_predict_gives_inference_json_per_image_in_order(models, onnx_server, pth_server, kind):
    server = onnx_server if kind == "onnx" else pth_server
    expected = inference_json(models[kind], SAMPLE)
    got = []
    for start in (0, 3):  # the onnx server takes 4 files a request
        r = post(server, [(os.path.basename(p), read(p)) for p in SAMPLE[start:start + 3]])
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        got += r.json()
    assert [g["image"] for g in got] == [os.path.basename(p) for p in SAMPLE]
    for g in got:
        assert_same(g, expected[g["image"]])
    presents = {tuple(g["present"]) for g in got}
    assert len(presents) > 1  # the images differ in what is present: agreement means something


def test_predict_says_which_attributes_were_learnt_and_the_server_warns_once(models, onnx_server, pth_server):
    for server, model in ((onnx_server, models["onnx"]), (pth_server, models["pth"])):
        (record,) = post(server, [("a.jpg", read(SAMPLE[0]))]).json()
        assert record["learnt"] == {"Attr1": True, "Attr2": True, "Attr3": False, "Attr4": True}
        assert record["probabilities"]["Attr3"] == pytest.approx(0.2, abs=1e-6)
        assert httpx.get(server.url + "/model", headers=AUTH, timeout=10).json()["learnt"]["Attr3"] is False
        warnings = [line for line in server.log().splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: {model}: Attr3 was not learnt (no better than chance on images the model "
                            "never saw): its probability is the prevalence of the training labels and the answer "
                            "the majority's, whatever the image"]


def test_a_raw_image_body_gives_a_list_of_one(models, onnx_server):
    r = httpx.post(onnx_server.url + "/predict?name=shirt.jpg", content=read(SAMPLE[1]),
                   headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200
    (got,) = r.json()
    assert got["image"] == "shirt.jpg"
    assert_same({**got, "image": "img_0002.jpg"}, inference_json(models["onnx"], SAMPLE[1:2])["img_0002.jpg"])


def truncated():
    return read(SAMPLE[0])[:2000]


def test_unreadable_files_are_errors_in_their_place(onnx_server):
    files = [("a.jpg", read(SAMPLE[0])), ("notes.jpg", b"not a picture\n"), ("cut.jpg", truncated()),
             ("bomb.png", png_declaring(100_000, 100_000))]
    r = post(onnx_server, files)
    assert r.status_code == 200
    a, notes, cut, bomb = r.json()
    assert a["image"] == "a.jpg" and "present" in a
    assert notes == {"image": "notes.jpg", "error": notes["error"]}
    assert notes["error"].startswith("notes.jpg: cannot read image (UnidentifiedImageError")
    assert "BytesIO" not in notes["error"]
    assert cut["error"].startswith("cut.jpg: cannot read image")
    assert bomb["error"].startswith("bomb.png: image ") and "decompression bomb" in bomb["error"]
    # none readable: 400, the same records under "images"
    r = post(onnx_server, files[1:])
    assert r.status_code == 400
    assert r.json()["error"] == "none of the 3 files could be read as an image"
    assert [x["image"] for x in r.json()["images"]] == ["notes.jpg", "cut.jpg", "bomb.png"]


def test_error_statuses_are_json(onnx_server):
    url = onnx_server.url
    cases = [
        (httpx.get(url + "/nowhere"), 404, "Not Found"),
        (httpx.get(url + "/predict"), 405, "Method Not Allowed"),
        (httpx.post(url + "/predict", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}), 415,
         "content type text/plain not accepted"),
        (httpx.post(url + "/predict", content=b"x", headers=AUTH), 415, "content type (none) not accepted"),
        (httpx.post(url + "/predict", data={"file": "a path/or/url.jpg"}, files={"other": ("a.jpg", b"x")},
                    headers=AUTH), 400, "no file: send the images as multipart parts named file"),
        (post(onnx_server, [("a.jpg", read(SAMPLE[0]))], path="/explain"), 501,
         "model.onnx: Grad-CAM needs the PyTorch model (.pth)"),
    ]
    for r, status, start in cases:
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"].startswith(start), r.json()


def test_the_token_is_required_and_compared(onnx_server):
    image = [("a.jpg", read(SAMPLE[0]))]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
        r = post(onnx_server, image, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": "missing or wrong token: send Authorization: Bearer <token>"}
    assert post(onnx_server, image).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/"):  # probes, scrapers and the page need no token
        assert httpx.get(onnx_server.url + path).status_code == 200


def raw_request(port, head, body=b"", read_reply=True):
    """Send HTTP/1.1 head and body on a fresh socket; the reply's status line and body (or the open socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(head.replace("\n", "\r\n").encode() + body)
    if not read_reply:
        return s
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and b'"}' in reply.split(b"\r\n\r\n", 1)[1]:
                break
    s.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), head.decode(), body


def test_limits_refuse_before_the_body_is_read(onnx_server):
    port = onnx_server.port
    # Content-Length over --max-body: 413 after the headers alone (the 10 MB never sent)
    status, _, body = raw_request(port, f"POST /predict HTTP/1.1\nHost: x\nAuthorization: Bearer {TOKEN}\n"
                                        "Content-Type: image/jpeg\nContent-Length: 10000000\n\n", b"\xff\xd8")
    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body)["error"] == ("the request body is 10000000 bytes, more than the limit of 200000 "
                                         "(--max-body)")
    # chunked, no length: counted as it streams, refused once past the limit
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4))
    status, _, body = raw_request(port, f"POST /predict HTTP/1.1\nHost: x\nAuthorization: Bearer {TOKEN}\n"
                                        "Content-Type: image/png\nTransfer-Encoding: chunked\n\n", chunks)
    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body)["error"] == "the request body is more than the limit of 200000 bytes (--max-body)"
    r = post(onnx_server, [(f"{i}.jpg", read(SAMPLE[0])) for i in range(5)])
    assert r.status_code == 413 and r.json() == {"error": "more than 4 files in one request (--max-files)"}


def test_a_full_server_answers_503_with_retry_after_and_recovers(onnx_server):
    """6 requests whose bodies are still arriving fill --queue 6: the next one is refused at once, /readyz says
    503; once they finish, both are back."""
    head = (f"POST /predict HTTP/1.1\nHost: x\nAuthorization: Bearer {TOKEN}\nContent-Type: image/jpeg\n"
            f"Content-Length: {len(read(SAMPLE[0]))}\n\n")
    slow = [raw_request(onnx_server.port, head, read(SAMPLE[0])[:100], read_reply=False) for _ in range(6)]
    try:
        deadline = time.time() + 10
        while httpx.get(onnx_server.url + "/readyz").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        started = time.time()
        r = post(onnx_server, [("a.jpg", read(SAMPLE[0]))])
        assert time.time() - started < 1
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "the server is busy: try again shortly"}
        ready = httpx.get(onnx_server.url + "/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        for s in slow:
            s.sendall(read(SAMPLE[0])[100:])
        for s in slow:
            assert s.recv(200).startswith(b"HTTP/1.1 200 OK")
    finally:
        for s in slow:
            s.close()
    assert httpx.get(onnx_server.url + "/readyz").status_code == 200
    assert post(onnx_server, [("a.jpg", read(SAMPLE[0]))]).status_code == 200


def metric(text, name):
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, name
    return values[0]


def test_metrics_count_requests_batches_and_images(onnx_server):
    before = httpx.get(onnx_server.url + "/metrics").text
    assert post(onnx_server, [("a.jpg", read(SAMPLE[0])), ("b.jpg", b"no")]).status_code == 200
    assert post(onnx_server, [("a.jpg", read(SAMPLE[0]))], headers={}).status_code == 401
    after = httpx.get(onnx_server.url + "/metrics").text
    for name, grown in [('serve_requests_total{path="/predict",status="200"}', 1),
                        ('serve_requests_total{path="/predict",status="401"}', 1),
                        ('serve_request_seconds_count{path="/predict"}', 2),
                        ('serve_images_total{result="predicted"}', 1), ('serve_images_total{result="error"}', 1),
                        ("serve_batch_size_count", 1), ("serve_batch_size_sum", 1)]:
        assert metric(after, name) - (metric(before, name) if name in before else 0) == grown, name
    assert metric(after, "serve_queue_depth") == 0


def test_requests_arriving_together_share_a_forward():
    """The batcher itself: images queued while other requests are still being read wait (up to max_wait) and go
    in one forward of at most max_batch; a lone request goes at once."""
    class Counting:
        queue = batch = type("M", (), {"set": lambda self, v: None, "observe": lambda self, v: None})()

    async def scenario():
        forwards = []

        def forward(xs):
            forwards.append(list(xs))
            return [[x] for x in xs]

        batcher = serve.Batcher(forward, max_batch=4, max_wait=5.0, capacity=10, metrics=Counting())
        batcher.start()
        started = time.perf_counter()
        assert await asyncio.gather(*batcher.submit([1])) == [[1]]
        lone = time.perf_counter() - started
        batcher.reading = 2  # two requests being read
        first = batcher.submit([2, 3])
        await asyncio.sleep(0.05)
        assert forwards == [[1]]  # waiting for the others
        second = batcher.submit([4, 5, 6])
        batcher.reading = 0
        batcher.wake.set()
        assert await asyncio.gather(*first, *second) == [[2], [3], [4], [5], [6]]
        with pytest.raises(serve.QueueFull):
            batcher.submit(list(range(11)))
        await batcher.stop()
        return forwards, lone

    forwards, lone = asyncio.run(scenario())
    assert forwards == [[1], [2, 3, 4, 5], [6]] and lone < 1


def test_pth_server_draws_grad_cam_and_health_answers_meanwhile(models, pth_server):
    results = {}

    def explain():
        results["r"] = post(pth_server, [("a.jpg", read(SAMPLE[0]))], headers={}, path="/explain")

    worker = threading.Thread(target=explain)
    worker.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert httpx.get(pth_server.url + "/healthz", timeout=10).status_code == 200
    health = time.perf_counter() - started
    busy = worker.is_alive()
    worker.join(60)
    r = results["r"]
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(r.content))
    assert picture.width > 4 * picture.height / 2  # the image and 4 attribute panels in a row
    assert busy and health < 0.5, (busy, health)  # answered while the Grad-CAM was still running
    r = post(pth_server, [("a.jpg", read(SAMPLE[0])), ("b.jpg", read(SAMPLE[1]))], headers={}, path="/explain")
    assert r.status_code == 400 and r.json() == {"error": "send one image to explain, not 2"}


def test_sigterm_answers_the_requests_in_flight_then_exits_0(models):
    server = Server(models["root"], models["onnx"], torch=False)
    image = read(SAMPLE[2])
    head = f"POST /predict?name=x.jpg HTTP/1.1\nHost: x\nContent-Type: image/jpeg\nContent-Length: {len(image)}\n\n"
    try:
        in_flight = [raw_request(server.port, head, image[:500], read_reply=False) for _ in range(3)]
        deadline = time.time() + 10
        while httpx.get(server.url + "/readyz").json()["open"] < 3 and time.time() < deadline:
            time.sleep(0.05)  # until the server is reading the three bodies
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(server.url + "/healthz", timeout=5)
        for s in in_flight:
            s.sendall(image[500:])
        for s in in_flight:
            reply = b""
            while b"]" not in reply and (chunk := s.recv(65536)):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200 OK"), reply
            assert json.loads(reply.partition(b"\r\n\r\n")[2])[0]["image"] == "x.jpg"
            s.close()
        assert server.process.wait(30) == 0, server.log()
        assert "Traceback" not in server.log()
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_two_workers_answer_and_sum_their_metrics(models):
    server = Server(models["root"], models["onnx"], "--workers", "2", torch=False)
    try:
        with httpx.Client(timeout=60) as one, httpx.Client(timeout=60) as two:  # two connections
            for client in (one, two, one, two):
                r = client.post(server.url + "/predict", files=[("file", ("a.jpg", read(SAMPLE[0])))])
                assert r.status_code == 200 and r.json()[0]["image"] == "a.jpg"
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, 'serve_images_total{result="predicted"}') == 4  # whichever process answered
        assert "with 2 processes" in server.log()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("argv, message", [
    (["--model", "missing.onnx"], "error: missing.onnx: model file not found"),
    (["--model", "m.onnx", "--queue", "0"], "error: --queue must be at least 1"),
    (["--model", "m.onnx", "--max-wait-ms", "-1"], "error: --max-wait-ms must be 0 or more"),
    (["--model", "m.onnx", "--token", " "], "error: --token (or $SERVE_TOKEN) is empty"),
])
def test_bad_flags_are_one_error_line(tmp_path, argv, message):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert len(done.stderr.splitlines()) == 1


# ---- the page, in headless Chromium ----

def test_the_page_shows_what_predict_answers(browser, pth_server, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(pth_server.url + "/")
    page.wait_for_selector("#facts:has-text('efficientnet_lite0')")
    page.set_input_files("#files", SAMPLE[:2])
    page.wait_for_selector(".card >> nth=1")
    expected = post(pth_server, [(os.path.basename(p), read(p)) for p in SAMPLE[:2]], headers={}).json()
    cards = page.locator(".card")
    assert cards.count() == 2
    for i, record in enumerate(expected):
        card = cards.nth(i)
        assert card.locator(".name").inner_text() == record["image"]
        assert card.locator(".present").inner_text() == "Present: " + (", ".join(record["present"]) or "none")
        shown = card.locator(".row.on .label").all_inner_texts()
        assert shown == record["present"]
        assert card.locator(".row").count() == 4 and card.locator(".mark").count() == 4
    cards.nth(0).locator("button.explain").click()
    page.wait_for_selector(".card >> nth=0 >> .cam img")
    # a name that would be markup is shown as text and runs nothing
    evil = "<img src=x onerror=alert(1)>.jpg"
    page.set_input_files("#files", [{"name": evil, "mimeType": "image/jpeg", "buffer": read(SAMPLE[3])}])
    page.wait_for_selector(".card >> nth=2")
    assert page.locator(".card >> nth=2 >> .name").inner_text() == evil
    assert page.locator(".name img").count() == 0
    page.wait_for_timeout(300)
    assert dialogs == []
    assert all(u.startswith((pth_server.url, "blob:")) for u in requests), requests  # nothing from elsewhere
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("SERVE_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["SERVE_SCREENSHOT"])
    page.close()
