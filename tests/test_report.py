"""report.py: the HTML page train.py writes, checked as text and in headless Chromium (when installed)."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

import make_sample
import report
import train
from conftest import FAST

ODD = "odd<b>&\"q'.jpg"  # an image name that must be escaped
BROKEN = "bad<i>&\"x'.jpg"  # zero bytes: listed, not fatal


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run on 30 generated images whose labels say Attr4 is never present, with an oddly named image
    and an empty one; returns the run's folder (report.html, metrics.json, ...)."""
    folder = tmp_path_factory.mktemp("report_run")
    images, labels = folder / "images", folder / "labels.txt"
    make_sample.generate(30, str(images), str(labels), seed=11, na_rate=0.09)
    lines = [line.split() for line in open(labels).read().splitlines() if line.strip()]
    shutil.copy(images / lines[0][0], images / ODD)
    (images / BROKEN).write_bytes(b"")
    lines += [[ODD, "1", "0", "1", "0"], [BROKEN, "1", "1", "0", "0"]]
    with open(labels, "w") as f:
        for name, a1, a2, a3, _ in lines:
            f.write(f"{name} {a1} {a2} {a3} {'NA' if name.endswith('5.jpg') else '0'}\n")
    with_report = [a for a in FAST if a != "--no-report"]
    code = train.main([*with_report, "--backbone", "mobilenet_v3_large", "--labels", str(labels),
                       "--images", str(images),
                       "--out", str(folder / "model.pth"), "--curve", str(folder / "curve.png"), "--epochs", "2",
                       "--cache-dir", str(folder / "cache")])
    assert code == 0
    return folder


class Tables(HTMLParser):
    """The cells of every <table id=...> and all <img> sources."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.current, self.cell = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.current = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.current is not None:
            self.current.append([])
        elif tag in ("td", "th") and self.current is not None:
            self.cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.current[-1].append(self.cell)
            self.cell = None
        elif tag == "table":
            self.current = None


def parsed(folder):
    page = Tables()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    return page


def expected_rows(folder):
    metrics = json.load(open(folder / "metrics.json"))["validation"]["attributes"]
    return [[r["attribute"], str(r["positives"]), str(r["negatives"]),
             "n/a" if r["ap"] is None else f"{r['ap']:.3f}", f"{r['threshold']:.3f}", f"{r['f1']:.3f}"]
            for r in metrics]


def shown_rows(rows):
    """attribute, pos, neg, AP (n/a and its reason cut to n/a), thr, F1 of the page's metrics table."""
    return [[r[0], r[1], r[2], r[3].split(" (")[0], r[5], r[6]] for r in rows[1:]]


def test_the_page_holds_the_numbers_of_metrics_json_and_names_why_an_attribute_has_none(trained):
    page = parsed(trained)
    assert shown_rows(page.tables["metrics"]) == expected_rows(trained)
    attr4 = page.tables["metrics"][-1]
    assert attr4[0] == "Attr4" and attr4[3].startswith("n/a (no known positives")


def test_the_page_opens_with_the_runs_verdicts_and_shows_no_mistakes_of_an_attribute_not_learnt(trained):
    """The verdict table is the run's (metrics.json: the same rows, the same p-values), above everything else; an
    attribute not learnt (here Attr4, which has no positive at all, and whatever 2 epochs on a random backbone did
    not learn) shows given positives beside given negatives, no "mistakes"."""
    text = (trained / "report.html").read_text(encoding="utf-8")
    metrics = json.load(open(trained / "metrics.json"))["validation"]["attributes"]
    rows = parsed(trained).tables["verdicts"][1:]
    assert [r[0] for r in rows] == [m["attribute"] for m in metrics]
    assert [r[1] == "yes" for r in rows] == [m["learnt"] for m in metrics]
    for r, m in zip(rows, metrics):
        if m["p_adjusted"] is not None:
            assert float(r[3]) == pytest.approx(m["p_adjusted"], rel=1e-2, abs=1e-3)
    assert text.index('id="verdict"') < text.index("<h2>Run</h2>")
    assert metrics[3]["learnt"] is False
    for m in metrics:
        heading = f"<h3>{m['attribute']}: not learnt, no mistakes shown</h3>"
        assert (heading in text) == (not m["learnt"])
    attr4 = text.split("<h3>Attr4: not learnt, no mistakes shown</h3>")[1].split("<h3>")[0]
    shown = min(report.MISTAKES, metrics[3]["negatives"])  # the validation rows' known negatives, at most 6
    assert "Given positives:</p><p>none</p>" in attr4 and attr4.count("given 0") == shown > 0


def test_the_page_is_self_contained_escapes_names_and_lists_the_unreadable_image(trained):
    text = (trained / "report.html").read_text(encoding="utf-8")
    assert "<script" not in text and not re.search(r"(src|href)=\"(?!data:)", text)  # no network, no scripts
    page = parsed(trained)
    assert page.images and all(src.startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
                               for src in page.images)
    assert "odd<b>" not in text and "bad<i>" not in text
    assert any(BROKEN in row[0] for row in page.tables["unreadable"])  # the parser unescapes: the name came through
    assert "bad&lt;i&gt;&amp;&quot;x&#x27;.jpg" in text
    # Each heading names the thresholds the model predicts with (0.5 here); a validation split has no audit.
    assert "<h2>Per attribute, threshold 0.5</h2>" in text and "Most confident mistakes, threshold 0.5" in text
    assert "The audit needs out-of-fold predictions" in text


def test_gallery_and_tables_escape_every_name():
    html = report.gallery([(ODD, "data:image/jpeg;base64,AA", "data:image/jpeg;base64,AA", "x")])
    assert ODD not in html and "odd&lt;b&gt;&amp;&quot;q&#x27;.jpg" in html


def test_confident_mistakes_come_most_confident_first_and_skip_na():
    import numpy as np

    scores = np.array([[0.9], [0.6], [0.05], [0.95], [0.2]])
    y = np.array([[0], [0], [1], [-1], [1]])
    assert report.confident_mistakes(scores, y, [0.5], 0).tolist() == [2, 0, 4, 1]


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(e.message || ('failed to load ' + (e.target.tagName || ''))),
                        true);
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = (...args) => { window.__errors.push(level + ': ' + args.join(' ')); original(...args); };
}
window.addEventListener('load', () => {
  const images = [...document.images];
  const result = {errors: window.__errors, images: images.length,
                  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
                  metrics: [...document.querySelectorAll('#metrics tr')]
                             .map(r => [...r.cells].map(c => c.textContent)),
                  width: document.documentElement.scrollWidth,
                  wide: [...document.querySelectorAll('table, ul, figure, .figs, h1, h2, p')]
                          .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth)
                          .map(e => e.id || e.tagName)};
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(not chromium(), reason="chromium is not installed (apt-get install chromium; .ci/run does it)")
def test_the_page_in_headless_chromium(trained, tmp_path):
    """No console errors, every <img> decoded (naturalWidth > 0), the metrics table holds metrics.json's numbers,
    nothing is wider than a 1280-pixel window; a screenshot is saved beside the report."""
    probe = tmp_path / "probe.html"
    probe.write_text((trained / "report.html").read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1),
                     encoding="utf-8")
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
              "--window-size=1280,2400"]
    done = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert result["errors"] == []
    assert result["images"] == len(parsed(trained).images) > 0 and result["broken"] == []
    assert shown_rows(result["metrics"]) == expected_rows(trained)
    assert result["width"] <= 1280 and result["wide"] == []
    shot = trained / "report_screenshot.png"
    subprocess.run([*common, f"--screenshot={shot}", (trained / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
