"""review.py against the real server on a loopback port: the queue's order, decisions as SQLite rows, undo, the
export read back by the labels parser, kill -9 between acknowledged decisions, two clients at once, bad input; the
page driven by keys in headless Chromium (Playwright with Debian's chromium). The audit's data (AuditData) is
generated here, except in one test that runs the real audit on generated images."""
import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import engine
import review
from conftest import ROOT, ServerProcess
from dataset import parse_labels

EVIL = '<b>"&amp;<script>.jpg'  # an image name that would be markup
N, K = 10, 4
# The server with its AuditData replaced by the JSON file argv[1] (the audit itself is tested in
# test_review_py_builds_its_queue_from_the_audit_of_the_labels).
CHILD = """
import json, sys
import numpy as np
import audit, review
with open(sys.argv[1]) as f:
    d = json.load(f)
d["targets"] = np.array(d["targets"], dtype=np.int8)
d["probabilities"] = np.array(d["probabilities"], dtype=np.float32)
d["score"] = np.array([[np.nan if v is None else v for v in row] for row in d["score"]])
review.load_audit = lambda args: audit.AuditData(**d)
sys.exit(review.main(sys.argv[2:]))
"""


class Server(ServerProcess):
    """python review.py ... in a subprocess on a free port; .url, .kill() (SIGKILL), .stop() (SIGTERM) -> code."""

    def __init__(self, folder, *flags, data=None):
        command = ["-c", CHILD, data] if data else [os.path.join(ROOT, "review.py")]
        super().__init__([*command, *flags], folder=folder, name="review", ready="/api/state", cwd=folder,
                         env={"PYTHONPATH": ROOT}, timeout=120)

    def get(self, path, **params):
        return httpx.get(self.url + path, params=params, timeout=30)

    def post(self, path, body, **kw):
        return httpx.post(self.url + path, json=body, timeout=30, **kw)


def make_data(folder, model=None):
    """10 generated images (one named EVIL) with header-less labels (~20% NA), a labels line whose image is missing,
    and an AuditData as JSON with seeded probabilities, where EVIL's Attr1 (given 0, p 0.99) is the most suspect
    cell. Returns (path of the JSON, the dict)."""
    import audit
    import make_sample

    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels.txt")
    make_sample.generate(N, images, labels, seed=3, na_rate=0.2)
    os.rename(os.path.join(images, "img_0003.jpg"), os.path.join(images, EVIL))
    with open(labels) as f:
        text = f.read().replace("img_0003.jpg", EVIL)
    with open(labels, "w") as f:
        f.write(text + "gone.jpg 1 0 1 0\n")
    table = parse_labels(labels)
    keep = [i for i, name in enumerate(table.names) if name != "gone.jpg"]
    targets = table.targets[keep]
    p = np.random.default_rng(0).uniform(0.05, 0.95, targets.shape).astype(np.float32)
    assert targets[2, 0] == 0
    p[2, 0] = 0.99
    score = audit.label_quality(p, targets)
    data = {"labels": labels, "attributes": list(table.attributes), "names": [table.names[i] for i in keep],
            "paths": [os.path.join(images, table.names[i]) for i in keep], "targets": targets.tolist(),
            "probabilities": p.tolist(), "score": [[None if np.isnan(v) else float(v) for v in r] for r in score],
            "source": "generated for the tests", "model": model, "labels_sha256": engine.file_sha256(labels),
            "verdicts": [{"attribute": a, "learnt": True, "p_adjusted": 1e-6} for a in table.attributes]}
    path = os.path.join(folder, "audit.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import write_checkpoint

    folder = tmp_path_factory.mktemp("review")
    model = write_checkpoint(folder / "model.pth", "mobilenet_v3_large", image_size=64)
    path, data = make_data(str(folder), model=model)
    return {"folder": str(folder), "json": path, "data": data}


@pytest.fixture(scope="module")
def server(setup):
    server = Server(setup["folder"], "--labels", setup["data"]["labels"], data=setup["json"])
    yield server
    assert server.stop() == 0, server.log()


def expected_order(data):
    """Queue positions by hand: known cells by 1 - p(given label) (cleanlab's self-confidence), most suspect first,
    then NA cells by |p - 0.5|, most confident first."""
    y, p = np.array(data["targets"]), np.array(data["probabilities"])
    cells = [(i, k) for i in range(len(y)) for k in range(K)]
    known = sorted((c for c in cells if y[c] >= 0), key=lambda c: -(1 - (p[c] if y[c] == 1 else 1 - p[c])))
    na = sorted((c for c in cells if y[c] < 0), key=lambda c: -abs(p[c] - 0.5))
    return known + na


def decisions(db):
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM decisions ORDER BY id")]


def applied(data, db):
    """The labels parser's targets of data's labels with the decisions in db applied, computed from the rows
    alone: per cell, the latest decision that no later row undoes."""
    table = parse_labels(data["labels"])
    y = table.targets.copy()
    rows = decisions(db)
    undone = {r["undoes"] for r in rows if r["undoes"] is not None}
    for r in rows:
        if r["undoes"] is None and r["id"] not in undone:
            y[list(table.names).index(r["image"]), table.attributes.index(r["attribute"])] = review.VALUES[r["after"]]
    return table, y


def test_queue_lists_known_cells_by_score_then_na_cells_by_confidence_with_filters(server, setup):
    data = setup["data"]
    r = server.get("/api/queue", limit=500)
    assert r.status_code == 200
    queue = r.json()
    order = expected_order(data)
    assert queue["total"] == N * K and [(it["row"], it["attribute"]) for it in queue["items"]] == \
        [(i, data["attributes"][k]) for i, k in order]
    first = queue["items"][0]
    assert first["image"] == EVIL and first["given"] == "0" and first["suggested"] == "1"
    assert first["probability"] == pytest.approx(0.99) and first["score"] == pytest.approx(0.99, abs=1e-6)
    assert first["decided"] is None and len(first["others"]) == K - 1
    na = [it for it in queue["items"] if it["kind"] == "na"]
    assert na and all(it["score"] is None and it["given"] == "NA" for it in na)
    assert queue["items"][-len(na):] == na
    page = server.get("/api/queue", attribute="Attr2", kind="na", offset=1, limit=2).json()
    expected = [it for it in queue["items"] if it["attribute"] == "Attr2" and it["kind"] == "na"]
    assert page["total"] == len(expected) and page["items"] == expected[1:3]
    state = server.get("/api/state").json()
    assert (state["queue"], state["known"], state["na"]) == (N * K, N * K - len(na), len(na))
    assert state["gradcam"] and not state["labels_changed"]


# ---- the page, in headless Chromium ----

def wait_saved(page, count):
    """Until the server has acknowledged the page's count-th decision (the page counts them in <body data-saved>;
    the page's CSP allows no evaluated script, so the tests read the page as a person would, plus that)."""
    page.wait_for_selector(f"body[data-saved='{count}']", state="attached", timeout=10_000)


def wait_position(page, n):
    page.wait_for_selector(f"#position:text-is('item {n} of {N * K}')", timeout=10_000)


def test_the_page_decides_by_keyboard_undoes_and_exports(browser, server, setup, tmp_path):
    data, db = setup["data"], os.path.join(setup["folder"], "review.sqlite")
    order = [(data["names"][i], data["attributes"][k]) for i, k in expected_order(data)]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs, requests = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#who:not([hidden])")  # no --reviewer: the page asks once
    page.fill("#who-name", "ana")
    page.press("#who-name", "Enter")
    page.wait_for_selector("#item-name:not(:empty)")
    # the most suspect cell first; its name, markup in it, shown as text
    assert page.locator("#item-name").inner_text() == EVIL and page.locator("#item-name *").count() == 0
    assert page.locator("#item-attribute").inner_text() == "Attr1" and page.locator("#item-given").inner_text() == "0"
    page.wait_for_selector("#cam[src^='blob:']")

    keys = ["1", "0", "n", "Enter", "k"]
    items = server.get("/api/queue", limit=len(keys)).json()["items"]
    expected = ["1", "0", "NA", items[3]["suggested"], items[4]["given"]]
    for n, key in enumerate(keys, 1):
        page.keyboard.press(key)
        wait_saved(page, n)
    rows = decisions(db)
    assert [(r["image"], r["attribute"], r["after"], r["reviewer"]) for r in rows] == \
        [(*order[i], expected[i], "ana") for i in range(5)]
    assert [r["before"] for r in rows] == [it["given"] for it in items]
    assert page.locator("#position").inner_text() == f"item 6 of {N * K}"

    page.keyboard.press("u")  # takes back k on item 5 and shows it again
    wait_position(page, 5)
    page.wait_for_selector("#status:has-text('undone')")
    last = decisions(db)[-1]
    assert last["undoes"] == rows[-1]["id"] and last["after"] == items[4]["given"]
    assert page.locator("#item-decided").inner_text() == "not reviewed"
    page.keyboard.press("ArrowLeft")
    wait_position(page, 4)
    page.keyboard.press("ArrowRight")
    page.click("#actions button[data-action='0']")  # the mouse does what the keys do
    wait_position(page, 6)
    wait_saved(page, 6)
    assert decisions(db)[-1]["after"] == "0" and decisions(db)[-1]["attribute"] == order[4][1]

    with page.expect_download() as info:
        page.click("#export")
    exported = str(tmp_path / "exported.txt")
    info.value.save_as(exported)
    table, y = applied(data, db)
    back = parse_labels(exported)
    assert back.names == table.names and (back.targets == y).all() and back.attributes == table.attributes

    timings = json.loads(page.locator("body").get_attribute("data-timings"))
    assert len(timings) == 9 and max(timings) < 100, timings  # the next item on screen within 100 ms of a key
    # reopened, the page continues at the first item without a decision (the sixth)
    page.reload()
    page.wait_for_selector("#item-name:not(:empty)")
    assert page.locator("#position").inner_text() == f"item 6 of {N * K}"
    assert dialogs == [] and all(u.startswith((server.url, "blob:")) for u in requests), requests
    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
    if os.environ.get("REVIEW_SCREENSHOT"):  # the picture and the key-to-screen times, for docs/review.md
        shutil.copy(tmp_path / "review.png", os.environ["REVIEW_SCREENSHOT"])
        with open(os.environ["REVIEW_SCREENSHOT"] + ".timings.json", "w") as f:
            json.dump(timings, f)
    page.close()


# ---- the API ----

def test_a_decision_is_a_committed_row_with_before_after_time_and_reviewer(server, setup):
    data, db = setup["data"], os.path.join(setup["folder"], "review.sqlite")
    image, attribute = data["names"][9], "Attr4"
    given = review.TEXT[data["targets"][9][3]]
    first = server.post("/api/decisions", {"image": image, "attribute": attribute, "value": "NA", "reviewer": "bo"})
    assert first.status_code == 200, first.text
    second = server.post("/api/decisions", {"image": image, "attribute": attribute, "value": "1", "reviewer": "cy"})
    a, b = first.json(), second.json()
    assert (a["before"], a["after"], b["before"], b["after"]) == (given, "NA", "NA", "1")
    assert decisions(db)[-2:] == [{**a, "undoes": None}, {**b, "undoes": None}]  # stored before it was answered
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", a["time"]) and a["time"] <= b["time"]
    item = next(it for it in server.get("/api/queue", limit=500).json()["items"]
                if (it["image"], it["attribute"]) == (image, attribute))
    assert item["decided"] == b and item["value"] == "1"


def test_undo_takes_back_the_reviewers_latest_decision_in_a_row_of_its_own(server, setup):
    data, db = setup["data"], os.path.join(setup["folder"], "review.sqlite")
    image = data["names"][8]
    given = review.TEXT[data["targets"][8][0]]
    cell = {"image": image, "attribute": "Attr1"}
    x = server.post("/api/decisions", {**cell, "value": "0", "reviewer": "dee"}).json()
    y = server.post("/api/decisions", {**cell, "value": "1", "reviewer": "eve"}).json()
    r = server.post("/api/undo", {"reviewer": "dee"})  # dee's latest is x, under eve's later y: the cell stays 1
    assert r.status_code == 200 and r.json()["undone"] == x and r.json()["value"] == "1" and r.json()["decided"] == y
    r = server.post("/api/undo", {"reviewer": "eve", "id": y["id"]})
    assert r.json()["value"] == given and r.json()["decided"] is None
    rows = decisions(db)[-2:]
    assert [(u["undoes"], u["before"], u["after"], u["reviewer"]) for u in rows] == \
        [(x["id"], "1", "1", "dee"), (y["id"], "1", given, "eve")]
    assert server.post("/api/undo", {"reviewer": "eve", "id": y["id"]}).status_code == 409
    assert server.post("/api/undo", {"reviewer": "nobody-yet"}).status_code == 409
    assert server.post("/api/undo", {"reviewer": "eve", "id": 10 ** 6}).status_code == 404


def test_bad_requests_are_json_errors_and_no_path_is_taken_from_the_client(server, setup):
    name = setup["data"]["names"][0]
    cases = [({"image": "nope.jpg", "attribute": "Attr1", "value": "1", "reviewer": "a"}, "unknown image"),
             ({"image": name, "attribute": "Attr9", "value": "1", "reviewer": "a"}, "unknown attribute"),
             ({"image": name, "attribute": "Attr1", "value": "yes", "reviewer": "a"}, "must be"),
             ({"image": name, "attribute": "Attr1", "value": 1, "reviewer": "a"}, "must be"),
             ({"image": name, "attribute": "Attr1", "value": "1"}, "reviewer missing"),
             ({"image": name, "attribute": "Attr1", "value": "1", "reviewer": "x" * 65}, "reviewer must be")]
    before = len(decisions(os.path.join(setup["folder"], "review.sqlite")))
    for body, message in cases:
        r = server.post("/api/decisions", body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    assert len(decisions(os.path.join(setup["folder"], "review.sqlite"))) == before
    r = httpx.post(server.url + "/api/decisions", content=b'{"image": 1}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415  # what a foreign page's form could send without a preflight
    r = httpx.post(server.url + "/api/decisions", content=b"{" * 5000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(server.url + "/api/decisions", content=b"[1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    for path in ("/api/image/..%2F..%2Fetc%2Fpasswd", "/api/image/10", "/api/image/-1", "/api/image/0x1",
                 "/api/gradcam/0/4", "/api/gradcam/..%2Fmodel.pth/0", "/labels.txt", "/review.py"):
        r = server.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
    for params in ({"kind": "bad"}, {"attribute": "<x>"}, {"limit": "501"}, {"offset": "-1"}, {"limit": "0"}):
        assert server.get("/api/queue", **params).status_code == 400, params
    r = httpx.get(server.url + "/api/state", headers={"Host": f"rebound.example:{server.port}"})
    assert r.status_code == 421 and "own address" in r.json()["error"]  # a foreign name resolved to 127.0.0.1
    page = server.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "unsafe" not in \
        page.headers["content-security-policy"]
    image = server.get("/api/image/2")  # the file of row 2 (EVIL's), as it is on disk
    with open(setup["data"]["paths"][2], "rb") as f:
        assert image.status_code == 200 and image.content == f.read() and image.headers["content-type"] == "image/jpeg"


def test_grad_cam_is_drawn_per_item_on_request_and_then_kept(server):
    t0 = time.perf_counter()
    first = server.get("/api/gradcam/4/2")
    drawn = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = server.get("/api/gradcam/4/2")
    kept = time.perf_counter() - t0
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content.startswith(b"\x89PNG") and again.content == first.content
    assert server.get("/api/gradcam/4/1").content != first.content  # another attribute, another map
    assert kept < drawn + 0.05  # the second is not drawn again (a forward and a backward)


def test_two_clients_deciding_at_once_lose_nothing(server, setup):
    data, db = setup["data"], os.path.join(setup["folder"], "review.sqlite")
    before = len(decisions(db))
    answers, barrier = {}, threading.Barrier(2)

    def client(who):
        barrier.wait()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            answers[who] = [c.post("/api/decisions", json={"image": data["names"][i % N], "attribute": "Attr3",
                                                           "value": str(i % 2), "reviewer": who}) for i in range(15)]

    threads = [threading.Thread(target=client, args=(who,)) for who in ("fay", "gus")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.status_code == 200 for rs in answers.values() for r in rs)
    rows = decisions(db)[before:]
    assert sorted(r["id"] for r in rows) == sorted(r.json()["id"] for rs in answers.values() for r in rs)
    assert len(rows) == 30
    for r in rows:  # each decision's before is the after of the cell's decision before it, whoever made it
        earlier = [e for e in decisions(db) if (e["image"], e["attribute"]) == (r["image"], r["attribute"])
                   and e["id"] < r["id"]]
        assert r["before"] == (earlier[-1]["after"] if earlier else
                               review.TEXT[data["targets"][data["names"].index(r["image"])][2]])


def test_two_servers_on_one_database_lose_nothing(tmp_path):
    """Two Ledgers (as two review.py processes hold) writing the same cells from two threads at once."""
    db = str(tmp_path / "review.sqlite")
    ledgers = [review.Ledger(db), review.Ledger(db)]
    errors = []

    def write(ledger, who):
        try:
            for i in range(25):
                ledger.decide(f"img{i % 5}.jpg", "A", "1" if i % 2 else "0", who, given="NA")
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(ledger, who)) for ledger, who in zip(ledgers, ("p", "q"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = decisions(db)
    assert len(rows) == 50 and [r["id"] for r in rows] == list(range(1, 51))
    for ledger in ledgers:
        with ledger.lock:
            ledger.refresh()
        assert ledger.last_id == 50 and len(ledger.decided()) == 5
        ledger.close()
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_export_read_back_equals_the_labels_with_the_decisions_applied(server, setup, tmp_path):
    data, db = setup["data"], os.path.join(setup["folder"], "review.sqlite")
    cell = {"image": data["names"][5], "attribute": "Attr2"}
    server.post("/api/decisions", {**cell, "value": "1", "reviewer": "hal"})
    server.post("/api/decisions", {**cell, "value": "0", "reviewer": "ivy"})  # decided differently: the latest wins
    text = server.get("/api/export").text
    out = tmp_path / "labels_reviewed.txt"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "review.py"), "--labels", data["labels"], "--export",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == text
    table, y = applied(data, db)
    back = parse_labels(str(out))
    assert back.names == table.names and back.attributes == table.attributes and (back.targets == y).all()
    original = open(data["labels"]).read().splitlines()
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    assert lines[len(comments):][-1] == "gone.jpg 1 0 1 0"  # a row without an image stays as it was
    assert not any(line.startswith("image_name") for line in lines)  # header-less in, header-less out
    changed = [(a, b) for a, b in zip(original, lines[len(comments):]) if a != b]
    assert len(changed) == int((table.targets != y).any(1).sum())  # only the lines of changed rows differ
    given, names = table.targets, list(table.names)
    holding = {(names.index(r["image"]), table.attributes.index(r["attribute"])) for r in live_decisions(db)}
    changed_cells = sum(given[c] >= 0 and y[c] != given[c] for c in holding)
    filled = sum(given[c] < 0 and y[c] >= 0 for c in holding)
    kept = sum(y[c] == given[c] for c in holding)
    assert comments[0].startswith(f"# review.py: {changed_cells} cells changed, {filled} NA filled, {kept} kept")
    assert f"# conflict: {cell['image']} Attr2 -> 0 (ivy, the latest); hal 1, ivy 0" in comments
    assert "decided differently" in done.stdout and cell["image"] in done.stdout


def live_decisions(db):
    rows = decisions(db)
    undone = {r["undoes"] for r in rows}
    return [r for r in rows if r["undoes"] is None and r["id"] not in undone]


def test_a_labels_file_changed_on_disk_is_said_and_decisions_still_apply(server, setup, browser):
    data = setup["data"]
    labels = data["labels"]
    with open(labels) as f:
        text = f.read()
    name = data["names"][7]
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    with open(labels, "w") as f:  # Attr4 of that row edited by hand meanwhile
        f.write(text.replace(line, " ".join(line.split()[:4] + ["1"])))
    state = server.get("/api/state").json()
    assert state["labels_changed"] and "changed on disk" in state["labels_message"]
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#changed:not([hidden])")
    assert "changed on disk" in page.locator("#changed").inner_text()
    page.close()
    assert server.post("/api/decisions", {"image": name, "attribute": "Attr3", "value": "1",
                                          "reviewer": "jo"}).status_code == 200
    back = parse_labels_text(server.get("/api/export").text, setup["folder"])
    row = list(back.names).index(name)
    assert back.targets[row, 3] == 1 and back.targets[row, 2] == 1  # the edit on disk and the decision


def parse_labels_text(text, folder):
    path = os.path.join(folder, "read_back.txt")
    with open(path, "w") as f:
        f.write(text)
    return parse_labels(path)


# ---- without the shared server ----

def test_kill_9_between_two_acknowledged_decisions_loses_neither(tmp_path):
    path, data = make_data(str(tmp_path))
    db = str(tmp_path / "review.sqlite")
    flags = ("--labels", data["labels"], "--reviewer", "kim")
    first = Server(str(tmp_path), *flags, data=path)
    a = first.post("/api/decisions", {"image": data["names"][0], "attribute": "Attr2", "value": "1"})
    assert a.status_code == 200
    first.kill()
    second = Server(str(tmp_path), *flags, data=path)
    state = second.get("/api/state").json()
    assert state["reviewed"] == 1 and state["reviewer"] == "kim"
    queue = second.get("/api/queue", limit=500).json()
    held = [it for it in queue["items"] if it["decided"]]
    assert [(it["image"], it["attribute"], it["value"]) for it in held] == [(data["names"][0], "Attr2", "1")]
    b = second.post("/api/decisions", {"image": data["names"][1], "attribute": "Attr1", "value": "0"})
    assert b.status_code == 200
    second.kill()
    assert [(r["id"], r["image"], r["after"], r["reviewer"]) for r in decisions(db)] == \
        [(1, data["names"][0], "1", "kim"), (2, data["names"][1], "0", "kim")]
    assert open(data["labels"]).read().endswith("gone.jpg 1 0 1 0\n")  # the labels file is never written


def test_review_py_builds_its_queue_from_the_audit_of_the_labels(tiny_set, tmp_path):
    labels, images = tiny_set
    # Lite0's ImageNet features (offline), fp32: on these 24 images Attr1-3 are learnt, Attr4 (2 positives) not.
    server = Server(str(tmp_path), "--labels", labels, "--images", images, "--backbone", "efficientnet_lite0",
                    "--image-size", "64", "--num-workers", "0", "--batch-size", "8", "--amp", "off",
                    "--folds", "3", "--epochs", "5", "--no-tta", "--cache-dir", str(tmp_path / "cache"),
                    "--model", str(tmp_path / "no_model.pth"))
    try:
        state = server.get("/api/state").json()
        table = parse_labels(labels)
        run = os.path.join(os.path.dirname(labels), "review_run")
        learnt = engine.read_oof(os.path.join(run, "oof.npz")).learnt
        assert learnt.any() and not learnt.all()
        # The queue holds the cells of the attributes learnt; the others are left out and the page says why.
        audited = table.targets[:, learnt]
        assert state["queue"] == audited.size and state["na"] == int((audited < 0).sum())
        left = [a for a, ok in zip(table.attributes, learnt) if not ok]
        assert state["not_learnt"] == left and all(a in state["not_learnt_message"] for a in left)
        items = server.get("/api/queue", limit=500).json()["items"]
        assert {it["attribute"] for it in items} == {a for a, ok in zip(table.attributes, learnt) if ok}
        known = [it for it in items if it["kind"] == "known"]
        for it in known:  # the audit's score: 1 - the out-of-fold probability of the given label
            p = it["probability"]
            assert it["score"] == pytest.approx(1 - (p if it["given"] == "1" else 1 - p), abs=1e-5)
        assert [it["score"] for it in known] == sorted((it["score"] for it in known), reverse=True)
        assert items[len(known):] == [it for it in items if it["kind"] == "na"]
        # The run it made is kept beside the database: its model draws the Grad-CAMs.
        assert os.path.isfile(os.path.join(run, "model.pth")) and os.path.isfile(os.path.join(run, "oof.npz"))
        assert state["gradcam"]
        r = server.get("/api/gradcam/0/0")
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    finally:
        assert server.stop() == 0, server.log()
    # Opened again, it reuses that run (in this process: train.py would be a child process, and is not run).
    args = review.parse_args(["--labels", labels, "--images", images, "--model", str(tmp_path / "no_model.pth")])
    data = review.load_audit(args)
    assert "review_run" in data.source and data.model == os.path.join(run, "model.pth")
    assert data.targets.shape == table.targets.shape


def run_review(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "review.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 1 0\n")
    (tmp_path / "folder.sqlite").mkdir()
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database, just bytes " * 200)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [(["--db", tmp_path / "folder.sqlite"], "folder.sqlite: is a folder"),
             (["--db", tmp_path / "junk.sqlite"], "junk.sqlite: cannot write the review database"),
             (["--db", tmp_path / "labels.txt" / "x.sqlite"], "x.sqlite: cannot write the review database"),
             (["--export", labels], "is the labels file"),
             (["--export", tmp_path / "out.txt", "--db", tmp_path / "none.sqlite"], "none.sqlite: no review database"),
             (["--reviewer", " "], "--reviewer: reviewer must be"),
             (["--bogus", "3"], "--bogus 3: not flags of review.py nor of train.py"),
             (["--port", str(taken.getsockname()[1])], "Address already in use")]
    for flags, message in cases:  # in this process: each error comes before anything is served
        code = review.main([str(a) for a in ("--labels", labels, "--images", tmp_path, "--port", "0", "--db",
                                             tmp_path / "ok.sqlite", *flags)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, (flags, err)
        assert len(err.splitlines()) == 1, err
    assert labels.read_text() == "a.jpg 1 0\n"
    taken.close()


def test_the_export_keeps_the_input_format_and_rewrites_only_the_changed_cells(tmp_path):
    """A BOM, CRLF line ends, a header naming only the attributes, tabs, a comment, a bad value and a duplicate
    line: the rows not decided stay byte for byte, a decided row changes in its decided cells only."""
    labels = tmp_path / "labels.txt"
    raw = ("\ufeffA B C\r\n# a comment\r\nx.jpg\t1  0 NA\r\ny.jpg 0 maybe 1\r\nz.jpg 1 1 1\r\nx.jpg 0 0 0\r\n")
    labels.write_bytes(raw.encode("utf-8"))
    ledger = review.Ledger(str(tmp_path / "review.sqlite"))
    ledger.decide("x.jpg", "C", "1", "ana", given="NA")  # NA filled
    ledger.decide("x.jpg", "A", "1", "ana", given="1")  # kept
    ledger.decide("y.jpg", "A", "1", "ana", given="0")  # changed ...
    ledger.decide("y.jpg", "A", "0", "bob", given="0")  # ... back: kept, decided differently
    ledger.decide("gone.jpg", "A", "1", "ana", given="NA")  # not in the file
    text, what = review.reviewed_labels(str(labels), ledger)
    assert what["counts"] == {"changed": 0, "na_filled": 1, "kept": 2} and what["skipped"] == 1
    assert [c["image"] for c in what["conflicts"]] == ["y.jpg"]
    assert text.startswith(b"\xef\xbb\xbf# review.py: 0 cells changed, 1 NA filled, 2 kept")
    head, rest = text.split(b"A B C\r\n", 1)
    assert head.count(b"\r\n") == 2 and b"# conflict: y.jpg A -> 0 (bob, the latest); ana 1, bob 0" in head
    assert rest == b"# a comment\r\nx.jpg\t1  0 1\r\ny.jpg 0 maybe 1\r\nz.jpg 1 1 1\r\nx.jpg 0 0 0\r\n"
    out = tmp_path / "out.txt"
    out.write_bytes(text)
    back, given = parse_labels(str(out)), parse_labels(str(labels))
    assert back.names == given.names == ["x.jpg", "y.jpg", "z.jpg"] and back.attributes == ["A", "B", "C"]
    assert back.targets.tolist() == [[1, 0, 1], [0, -1, 1], [1, 1, 1]]
    ledger.close()


def test_a_queue_larger_than_the_sample_is_paged_filtered_and_exported_in_the_reference_order(tmp_path):
    """2,000 x 30 generated cells (the sample has 600 x 4), ties included, two attributes not learnt: the queue, its
    pages and filters follow the order of the old per-cell sorts, with the queue positions of the items; decisions
    move the first pending item and come back in the export."""
    import audit
    from dataset import write_labels

    n, width = 2000, 30
    g = np.random.default_rng(7)
    y = g.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, width), p=[0.2, 0.4, 0.4])
    p = g.random((n, width)).astype(np.float32)
    p[:400] = np.round(p[:400] * 20) / 20  # equal keys: in the cells' order, as stable sorts leave them
    learnt = np.ones(width, dtype=bool)
    learnt[[4, 21]] = False
    names, attributes = [f"im{i:05d}.jpg" for i in range(n)], [f"A{k}" for k in range(width)]
    labels = str(tmp_path / "labels.txt")
    write_labels(labels, attributes, names, y)
    score = audit.label_quality(p, y, learnt)
    cells = [(i, k) for i in range(n) for k in range(width) if learnt[k]]
    reference = sorted((c for c in cells if y[c] >= 0), key=lambda c: -float(score[c])) + \
        sorted((c for c in cells if y[c] < 0), key=lambda c: -abs(float(p[c]) - 0.5))
    known = int(((y >= 0) & learnt).sum())
    data = {"labels": labels, "attributes": attributes, "names": names, "paths": [""] * n, "targets": y.tolist(),
            "probabilities": p.tolist(), "score": [[None if np.isnan(v) else float(v) for v in r] for r in score],
            "source": "generated", "model": None, "labels_sha256": engine.file_sha256(labels),
            "verdicts": [{"attribute": a, "learnt": bool(ok), "p_adjusted": 0.01 if ok else 0.9}
                         for a, ok in zip(attributes, learnt)]}
    queue = review.Queue(audit.AuditData(**{**data, "targets": y, "probabilities": p, "score": score}))
    assert len(queue) == len(reference) and queue.counts == {"known": known, "na": len(reference) - known}
    whole = queue.select("", "")
    assert [divmod(int(c), width) for c in whole.cells(0, len(whole))] == reference
    a7 = [c for c in reference if c[1] == 7]
    assert [divmod(int(c), width) for c in queue.select("A7", "").cells(0, len(a7))] == a7
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(data))
    server = Server(str(tmp_path), "--labels", labels, "--reviewer", "ana", data=str(path))
    try:
        state = server.get("/api/state").json()
        assert (state["queue"], state["known"], state["na"]) == (len(reference), known, len(reference) - known)
        assert state["not_learnt"] == ["A4", "A21"]
        first = server.get("/api/queue", limit=500).json()
        assert first["total"] == len(reference) and first["first_pending"] == 0
        assert [(it["row"], it["column"]) for it in first["items"]] == reference[:500]
        assert [it["index"] for it in first["items"]] == list(range(500))
        across = server.get("/api/queue", offset=known - 250, limit=500).json()["items"]  # known part, then NA
        assert [(it["row"], it["column"]) for it in across] == reference[known - 250:known + 250]
        assert [it["kind"] for it in across] == ["known"] * 250 + ["na"] * 250
        na = server.get("/api/queue", kind="na", offset=10, limit=20).json()
        assert [(it["row"], it["column"], it["index"]) for it in na["items"]] == \
            [(*reference[known + j], known + j) for j in range(10, 30)]
        page = server.get("/api/queue", attribute="A7", offset=100, limit=50).json()
        assert page["total"] == len(a7) and [(it["row"], it["column"]) for it in page["items"]] == a7[100:150]
        assert [it["index"] for it in page["items"]] == [reference.index(c) for c in a7[100:150]]
        assert server.get("/api/queue", attribute="A4").json()["total"] == 0  # not learnt: not in the queue
        decided = reference[:3] + [a7[0]]
        for i, k in decided:
            value = "NA" if y[i, k] >= 0 else "1"
            assert server.post("/api/decisions", {"image": names[i], "attribute": attributes[k],
                                                  "value": value}).status_code == 200
        assert server.get("/api/queue", limit=1).json()["first_pending"] == 3
        assert server.get("/api/queue", attribute="A7", limit=1).json()["first_pending"] == 1
        undone = server.post("/api/undo", {}).json()
        assert (undone["undone"]["image"], undone["index"]) == (names[a7[0][0]], reference.index(a7[0]))
        back = parse_labels_text(server.get("/api/export").text, tmp_path)
        expected = y.copy()
        for i, k in decided[:3]:
            expected[i, k] = -1 if y[i, k] >= 0 else 1
        assert back.names == names and (back.targets == expected).all()
    finally:
        assert server.stop() == 0, server.log()


def parse_labels_text(text, folder):
    path = os.path.join(folder, "exported.txt")
    with open(path, "w") as f:
        f.write(text)
    return parse_labels(path)


def test_an_attribute_not_learnt_is_left_out_of_the_queue_and_the_page_says_why(browser, tmp_path):
    path, data = make_data(str(tmp_path))
    data["verdicts"][3] = {"attribute": "Attr4", "learnt": False, "p_adjusted": 0.62}
    data["score"] = [[None if k == 3 else v for k, v in enumerate(row)] for row in data["score"]]
    with open(path, "w") as f:
        json.dump(data, f)
    server = Server(str(tmp_path), "--labels", data["labels"], data=path)
    try:
        state = server.get("/api/state").json()
        assert state["queue"] == len(data["names"]) * 3 and state["not_learnt"] == ["Attr4"]
        items = server.get("/api/queue", limit=100).json()["items"]
        assert len(items) == len(data["names"]) * 3 and "Attr4" not in {it["attribute"] for it in items}
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#not-learnt:not([hidden])")
        said = page.locator("#not-learnt").inner_text()
        assert said.startswith("Not in the queue: Attr4 (p 0.62).") and "did not learn" in said
        page.close()
    finally:
        assert server.stop() == 0, server.log()
