"""Serve a trained model over HTTP: a JSON API, Prometheus metrics, and a page to try it.

    python serve.py --model model.onnx                  # http://127.0.0.1:8000/ ; Ctrl-C or SIGTERM stops it
    python serve.py --model model.pth --port 8080       # a .pth adds Grad-CAM (POST /explain)
    SERVE_TOKEN=secret python serve.py --model model.onnx --host 0.0.0.0 --workers 2

    curl -F file=@images/img_0001.jpg -F file=@images/img_0002.jpg http://127.0.0.1:8000/predict
    curl -H 'Content-Type: image/jpeg' --data-binary @images/img_0001.jpg http://127.0.0.1:8000/predict

POST /predict answers one object per image, each what `inference.py --json` prints (`image` is the uploaded
name); GET /healthz, /readyz (model loaded, queue not full), /metrics (Prometheus); GET / the page.
Images from concurrent requests share forwards (dynamic batching): a bounded queue, one thread running the
forwards, so the event loop answers /healthz while a batch runs. An .onnx model runs on ONNX Runtime without
torch: this file imports it only through inference.py's PyTorch path.
"""
import argparse
import asyncio
import contextlib
import hmac
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import web
from calibration import not_learnt_warning
from images import load_image
from inference import load_model, record
from utils import UserError, run_cli
from web import Refused, error_response, read_body

HOST = "127.0.0.1"  # this machine only; serving others is an explicit --host 0.0.0.0
PORT = 8000
MAX_BATCH = 32  # images per forward at most
MAX_WAIT_MS = 5.0  # how long queued images wait for requests still being read to join their forward
QUEUE = 64  # images waiting for a forward (and requests being read) at most; beyond it: 503 + Retry-After
MAX_BODY = 20_000_000  # bytes per request (20 MB)
MAX_FILES = 32  # images per request
TOKEN_ENV = "SERVE_TOKEN"  # the environment variable --token defaults to (a flag shows in `ps`, this does not)
RETRY_AFTER = 1  # seconds a refused client is told to wait
GRACE_S = 30  # SIGTERM: seconds the requests in flight get to finish
PAGE_FILES = {"/": ("serve.html", "text/html; charset=utf-8"), "/serve.js": ("serve.js", "text/javascript")}
# The page's script is a file of its own: no inline script is allowed, so an injected handler could not run.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; script-src 'self'"
ROUTES = ("/predict", "/explain", "/healthz", "/readyz", "/metrics", "/model", *PAGE_FILES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a trained model over HTTP (JSON API, metrics, a page).")
    p.add_argument("--model", default="model.pth", help="checkpoint written by train.py, or an .onnx from export.py")
    p.add_argument("--host", default=HOST, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=PORT, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="images per forward at most")
    p.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS,
                   help="how long queued images wait for requests still being read to share their forward")
    p.add_argument("--queue", type=int, default=QUEUE,
                   help="images waiting (and requests being read) at most; beyond it requests get 503")
    p.add_argument("--max-body", type=int, default=MAX_BODY, help="bytes per request at most (413 beyond)")
    p.add_argument("--max-files", type=int, default=MAX_FILES, help="images per request at most (413 beyond)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"require `Authorization: Bearer TOKEN` on /predict and /explain (default: ${TOKEN_ENV})")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model")
    p.add_argument("--no-tta", action="store_true", help="skip the flip test-time augmentation (as inference.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda, then mps, then cpu")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="cpu, Linux, .pth: reuse freed memory instead of unmapping it (faster forwards, more RAM)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_args(args):
    for flag in ("port", "max_batch", "queue", "max_body", "max_files", "workers"):
        low = 0 if flag == "port" else 1
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {low}")
    if args.max_wait_ms < 0:
        raise UserError("--max-wait-ms must be 0 or more")
    if args.token is not None and not args.token.strip():
        raise UserError(f"--token (or ${TOKEN_ENV}) is empty; give a token or unset it")
    # inference.load_model's settings: images arrive decoded, so no DataLoader (--num-workers does not apply)
    args.batch_size, args.num_workers, args.explain = args.max_batch, 0, None


class Metrics:
    """The Prometheus series. With --workers N every process writes its own files into PROMETHEUS_MULTIPROC_DIR
    (set by main before they start) and /metrics sums them."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests answered, by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("serve_request_seconds", "request latency, arrival to the last byte", ["path"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.batch = Histogram("serve_batch_size", "images per forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                               registry=self.registry)
        self.queue = Gauge("serve_queue_depth", "images waiting for a forward", registry=self.registry,
                           multiprocess_mode="livesum")
        self.images = Counter("serve_images", "images answered, by result", ["result"], registry=self.registry)

    def text(self):
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


class QueueFull(Exception):
    pass


class Batcher:
    """A bounded queue of prepared images and the task that forwards them, up to max_batch at a time, on one
    thread. A forward starts at once when no request is being read (one client waits for nobody); while others
    are, it waits up to max_wait for them to join."""

    def __init__(self, forward, *, max_batch, max_wait, capacity, metrics):
        self.forward, self.max_batch, self.max_wait, self.capacity = forward, max_batch, max_wait, capacity
        self.metrics = metrics
        self.items = deque()  # (input, future, arrival time)
        self.reading = 0  # requests admitted whose images are not queued yet
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")  # forwards and Grad-CAM, one at a time
        self.wake = asyncio.Event()
        self.task = None

    def full(self):
        return len(self.items) >= self.capacity

    def submit(self, inputs):
        """Futures of the inputs' probability lists; QueueFull when they do not fit."""
        if len(self.items) + len(inputs) > self.capacity:
            raise QueueFull
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        now = loop.time()
        self.items.extend((x, f, now) for x, f in zip(inputs, futures))
        self.metrics.queue.set(len(self.items))
        self.wake.set()
        return futures

    def run_in_thread(self, function, *args):
        return asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.items:
                self.wake.clear()
                await self.wake.wait()
            deadline = self.items[0][2] + self.max_wait
            while len(self.items) < self.max_batch and self.reading and loop.time() < deadline:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), deadline - loop.time())
            batch = [self.items.popleft() for _ in range(min(self.max_batch, len(self.items)))]
            self.metrics.queue.set(len(self.items))
            self.metrics.batch.observe(len(batch))
            try:
                results = await self.run_in_thread(self.forward, [x for x, _, _ in batch])
            except Exception as e:  # a bug, not the input's fault: those requests get 500, the server goes on
                results = [e] * len(batch)
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self):
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.executor.shutdown(wait=True)


async def uploads(request, args):
    """[(name, file object)] from a multipart body (parts named `file`) or a raw image body."""
    import io

    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise Refused(415, f"content type {kind or '(none)'} not accepted; send multipart/form-data with parts "
                           f"named file, or one image with an image/* content type")
    body = await read_body(request, args.max_body, flag="--max-body")
    if kind.startswith("image/"):
        return [(request.query_params.get("name") or "image", io.BytesIO(body))]

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=args.max_files).parse()
    except MultiPartException as e:
        if str(e).startswith("Too many files"):
            raise Refused(413, f"more than {args.max_files} files in one request (--max-files)") from None
        raise Refused(400, f"the multipart body cannot be read ({e})") from None
    files = [(f.filename or "image", f.file) for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise Refused(400, "no file: send the images as multipart parts named file")
    return files


def prepare_all(files, prepare):
    """[(name, picture or None, input or None, error or None)]: decoded and preprocessed (a worker thread runs
    this, off the event loop)."""
    out = []
    for name, f in files:
        try:
            picture = load_image(f, name=name)
            out.append((name, picture, prepare(picture), None))
        except UserError as e:
            out.append((name, None, None, str(e)))
        finally:
            f.close()
    return out


def create_app(args):
    """The FastAPI app serving args.model (loaded here: a bad model file is one error line before serving)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    loaded = load_model(args)
    attributes, thresholds = loaded.facts["attributes"], loaded.facts["thresholds"]
    learnt = loaded.facts.get("learnt")
    warning = not_learnt_warning(loaded.facts, args.model)
    if warning and "SERVE_ARGS" not in os.environ:  # said once, by the process the user started, not each worker
        print(warning, file=sys.stderr, flush=True)
    metrics = Metrics()
    state = argparse.Namespace(batcher=None, open=0, draining=False, explaining=False)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.batcher = Batcher(loaded.forward, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                                capacity=args.queue, metrics=metrics)
        state.batcher.start()
        yield
        await state.batcher.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    web.install_errors(app)

    def authorize(request):
        if args.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), args.token.encode()):
            raise Refused(401, "missing or wrong token: send Authorization: Bearer <token>",
                          {"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def admitted():
        """A request being read and decoded counts against --queue too: refused at once when the server is full,
        before its body is read."""
        if state.open >= args.queue or state.batcher.full():
            raise Refused(503, "the server is busy: try again shortly", {"Retry-After": str(RETRY_AFTER)})
        state.open += 1
        state.batcher.reading += 1
        reading = True

        def done_reading():  # its images are queued (or it failed): the batcher need not wait for it
            nonlocal reading
            if reading:
                reading = False
                state.batcher.reading -= 1
                state.batcher.wake.set()

        try:
            yield done_reading
        finally:
            done_reading()
            state.open -= 1

    async def predicted(request):
        """[(name, picture or None, probabilities or None, error or None)] for the request's images."""
        authorize(request)
        async with admitted() as done_reading:
            prepared = await run_in_threadpool(prepare_all, await uploads(request, args), loaded.prepare)
            done_reading()
            try:
                futures = iter(state.batcher.submit([x for _, _, x, error in prepared if error is None]))
            except QueueFull:
                raise Refused(503, "the queue is full: try again shortly", {"Retry-After": str(RETRY_AFTER)}) from None
            results = [(name, picture, None if error else await next(futures), error)
                       for name, picture, x, error in prepared]
        metrics.images.labels("predicted").inc(sum(error is None for *_, error in results))
        metrics.images.labels("error").inc(sum(error is not None for *_, error in results))
        return results

    @app.post("/predict")
    async def predict(request: Request):
        results = [record(name, p, error, attributes=attributes, thresholds=thresholds, learnt=learnt)
                   for name, _, p, error in await predicted(request)]
        if all("error" in r for r in results):
            return error_response(400, f"none of the {len(results)} files could be read as an image", images=results)
        return JSONResponse(results)

    @app.post("/explain")
    async def explain(request: Request):
        """The picture `inference.py --explain` draws for one image (PNG)."""
        if loaded.figure is None:
            authorize(request)
            raise Refused(501, f"{os.path.basename(args.model)}: Grad-CAM needs the PyTorch model (.pth); an ONNX "
                               "model gives no gradients")
        if state.explaining:  # a Grad-CAM is a forward and a backward per attribute: one at a time
            authorize(request)
            raise Refused(503, "a Grad-CAM is being drawn: try again shortly", {"Retry-After": str(RETRY_AFTER)})
        state.explaining = True
        try:
            results = await predicted(request)
            if len(results) != 1:
                raise Refused(400, f"send one image to explain, not {len(results)}")
            name, picture, probabilities, error = results[0]
            if error is not None:
                raise Refused(400, error)

            def draw():
                from figures import figure_png

                return figure_png(loaded.figure(picture, probabilities, thresholds))

            return Response(await state.batcher.run_in_thread(draw), media_type="image/png")
        finally:
            state.explaining = False

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.draining:
            return error_response(503, "shutting down")
        if state.batcher is None or state.open >= args.queue or state.batcher.full():
            return error_response(503, "the queue is full", {"Retry-After": str(RETRY_AFTER)})
        return {"status": "ready", "queued": len(state.batcher.items), "open": state.open}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/model")
    async def model_facts():
        """What the page (or a client) needs to know: names, thresholds, limits, whether Grad-CAM is there."""
        return {"model": os.path.basename(args.model), "attributes": attributes, "thresholds": thresholds,
                "learnt": None if learnt is None else dict(zip(attributes, map(bool, learnt))),
                "backbone": loaded.facts["backbone"], "image_size": loaded.facts["image_size"],
                "explain": loaded.figure is not None, "token": args.token is not None,
                "max_files": args.max_files, "max_body": args.max_body}

    web.add_pages(app, PAGE_FILES, PAGE_POLICY)
    app.add_middleware(Measured, metrics=metrics)
    return app


class Measured:
    """ASGI middleware: every HTTP request counted by path and status, and timed."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"  # a bounded set of label values
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def app_from_env():
    """The app of one --workers process: uvicorn starts each from this import string; main passes the flags."""
    return create_app(argparse.Namespace(**json.loads(os.environ["SERVE_ARGS"])))


def server_class():
    class Server(web.server_class()):
        """uvicorn's server, which on SIGTERM or Ctrl-C stops accepting, lets the requests in flight (and so the
        images queued for them) be answered, then exits 0: uvicorn re-raises the signal after its graceful
        shutdown, and a server that stopped as asked is not a failure. /readyz says 503 meanwhile."""

        def handle_exit(self, sig, frame):
            app = self.config.loaded_app
            while app is not None and not hasattr(app, "state"):  # uvicorn's wrappers around the FastAPI app
                app = getattr(app, "app", None)
            if app is not None:
                app.state.serve.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"serving {self.model_name} at http://{host}:{port}/ (Ctrl-C or SIGTERM to stop)",
                      flush=True)

    return Server


def run(args):
    import uvicorn

    check_args(args)
    config = dict(host=args.host, port=args.port, log_level="warning", access_log=False,
                  timeout_graceful_shutdown=GRACE_S, lifespan="on")
    if args.workers == 1:
        server = server_class()(uvicorn.Config(create_app(args), **config))
        server.model_name = args.model
        server.run()
        return 0 if server.started else 1
    # Each process loads the model itself; fail here, in one line, on a model file that cannot load.
    create_app(args)
    os.environ["SERVE_ARGS"] = json.dumps(vars(args))
    made = None if "PROMETHEUS_MULTIPROC_DIR" in os.environ else tempfile.mkdtemp(prefix="serve-metrics-")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", made)
    uconfig = uvicorn.Config("serve:app_from_env", factory=True, workers=args.workers, **config)
    sock = uconfig.bind_socket()
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} at http://{host}:{port}/ with {args.workers} processes (Ctrl-C or SIGTERM to stop)",
          flush=True)
    from uvicorn.supervisors import Multiprocess

    try:
        Multiprocess(uconfig, sockets=[sock]).run()
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    return 0


def main(argv=None):
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
