"""The documentation site as a reader sees it: built by Sphinx, opened in headless Chromium.

The site (``make docs``: build/docs/html) is rebuilt here when it is missing or older than any of
its sources (a fresh Sphinx environment, warnings are errors). Three pages are then loaded in
Debian's Chromium, driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
no extra package, no port): the index, the API page of ``bll_ref.losses.local`` and the first
notebook. For each page the test asserts no JavaScript exception, no console error and no failed
resource load; that MathJax typeset the equations (``mjx-container`` nodes, none of them a TeX
error ``mjx-merror``); and that every image of the notebook page was decoded. The screenshots stay
in build/docs/screenshots/ (index.png, api-losses-local.png, notebook-01.png, and
notebook-01-figure.png scrolled to the notebook's first figure).

Chromium comes from apt (``apt-get install chromium``; tried here as root when missing). The test
is skipped, saying why, only when Chromium cannot be found or installed; with
``BLL_REQUIRE_BROWSER=1`` (CI) that is a failure instead.
"""
import base64
import json
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = ROOT / "build" / "docs" / "html"
SHOTS = ROOT / "build" / "docs" / "screenshots"
NOTEBOOKS_RUN = ROOT / "build" / "notebooks"
NOTEBOOKS_SRC = ROOT / "examples" / "notebooks"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


# ------------------------------------------------------------------------------ the browser
def _find_chromium():
    """(path, None) or (None, why not)."""
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name), None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "no chromium on PATH, and not root with apt-get to install it (apt-get install chromium)"
    print("test_docs_site: installing chromium with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        r = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium",
                           shell=True, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "apt-get install chromium did not finish in 15 minutes"
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name), None
    return None, f"apt-get install chromium failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"


class DevTools:
    """Chromium headless, spoken to with the DevTools protocol over --remote-debugging-pipe: JSON
    messages, each ended by a NUL byte, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, exe, profile):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds():  # in the child: the pipe ends become fd 3 and fd 4 (via free high numbers)
            os.dup2(to_chrome_r, 200)
            os.dup2(from_chrome_w, 201)
            os.dup2(200, 3)
            os.dup2(201, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,2000",
             "--allow-file-access-from-files", "about:blank"],
            preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium sent nothing in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, session=None, timeout=30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"DevTools {method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, method, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _problems(events):
    """JavaScript exceptions, console errors and failed loads among the recorded events."""
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')} ({d.get('url')})")
        elif m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                               for a in p["args"]))
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry']['text']} ({p['entry'].get('url')})")
    return out


PAGE_STATE = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = Array.from(document.images);
  return {
    title: document.title,
    mathjax: !!(window.MathJax && MathJax.version), mathjax_version: window.MathJax && MathJax.version,
    math_nodes: document.querySelectorAll("mjx-container").length,
    math_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent),
    unrendered: document.querySelectorAll("div.math, span.math").length,
    images: imgs.length,
    images_decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    with_fields: Array.from(document.querySelectorAll("dl.py > dt[id]"))
      .filter(dt => dt.nextElementSibling && dt.nextElementSibling.querySelector("dl.field-list")).map(dt => dt.id),
    data_uri_images: imgs.filter(i => i.src.startsWith("data:")).length,
    ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id),
    links: Array.from(document.querySelectorAll("a[href]")).map(a => a.getAttribute("href")),
    text: document.body.innerText.slice(0, 400),
  };
})()"""


def _visit(browser, path, shot, figure_shot=None):
    """Load HTML/path in a fresh tab; the page's state after MathJax, its problems; a screenshot
    of the top of the page (and with figure_shot, one scrolled to the page's first image)."""
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    browser.events.clear()
    for domain in ("Page", "Runtime", "Log"):
        browser.send(f"{domain}.enable", session)
    browser.send("Emulation.setDeviceMetricsOverride", session, width=1280, height=2000,
                 deviceScaleFactor=1, mobile=False)
    browser.send("Page.navigate", session, url=(HTML / path).as_uri())
    browser.wait_for("Page.loadEventFired")
    state = browser.send("Runtime.evaluate", session, expression=PAGE_STATE, awaitPromise=True,
                         returnByValue=True, timeout=60)["result"]["value"]
    time.sleep(0.3)  # let late console messages arrive
    browser.send("Runtime.evaluate", session, expression="1")
    png = browser.send("Page.captureScreenshot", session, format="png")["data"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / shot).write_bytes(base64.b64decode(png))
    if figure_shot and state["images"]:
        browser.send("Runtime.evaluate", session, expression="document.images[0].scrollIntoView()")
        png = browser.send("Page.captureScreenshot", session, format="png")["data"]
        (SHOTS / figure_shot).write_bytes(base64.b64decode(png))
    problems = _problems(browser.events)
    browser.send("Target.closeTarget", targetId=target)
    return state, problems


# -------------------------------------------------------------------------------- the site
def _newest_source():
    paths = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "docs" / "conf.py",
             *NOTEBOOKS_RUN.glob("*.ipynb"), *(ROOT / "benchmarks" / "results").glob("*.md")]
    for pkg in ("bll_ref", "exporters"):
        paths += (ROOT / pkg).rglob("*.py")
    return max(p.stat().st_mtime for p in paths)


def _ensure_notebooks():
    missing = [p.name for p in NOTEBOOKS_SRC.glob("*.ipynb") if not (NOTEBOOKS_RUN / p.name).is_file()]
    if missing:
        print(f"test_docs_site: executing the notebooks ({', '.join(missing)} missing in build/notebooks)",
              file=sys.stderr)
        r = subprocess.run([sys.executable, str(NOTEBOOKS_SRC / "run_notebooks.py"), "--out", str(NOTEBOOKS_RUN)],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"run_notebooks.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def site():
    _ensure_notebooks()
    index = HTML / "index.html"
    if not index.is_file() or index.stat().st_mtime < _newest_source():
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
                            "docs", str(HTML)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"sphinx failed (warnings are errors):\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}"
        print(f"test_docs_site: built the site in {time.monotonic() - t:.0f} s", file=sys.stderr)
    return HTML


@pytest.fixture(scope="module")
def browser():
    exe, why = _find_chromium()
    if exe is None:
        if os.environ.get("BLL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"BLL_REQUIRE_BROWSER=1 but {why}")
        print(f"test_docs_site: skipped: {why}", file=sys.stderr)
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="bll-chromium-") as profile:
        b = DevTools(exe, profile)
        try:
            b.send("Browser.getVersion", timeout=60)
            yield b
        finally:
            b.close()


# ------------------------------------------------------------------------------- the pages
def _first_notebook():
    return sorted(NOTEBOOKS_SRC.glob("*.ipynb"))[0].stem


def test_index_page_renders_its_equations_and_links_every_part(site, browser):
    state, problems = _visit(browser, "index.html", "index.png")
    assert not problems, f"index.html: {problems}"
    assert state["mathjax"], "MathJax did not load on index.html (the local copy under _static/mathjax?)"
    assert state["math_nodes"] > 0 and not state["math_errors"], state
    hrefs = set(state["links"])
    wanted = ["getting-started.html", "algorithm.html", "parallel.html", "gpu.html", "hardware.html",
              "hdf5-format.html", "results.html", "cli.html", "architecture.html", "api/index.html",
              *(f"notebooks/{p.stem}.html" for p in sorted(NOTEBOOKS_SRC.glob("*.ipynb")))]
    assert not [w for w in wanted if w not in hrefs], f"index.html lacks links to {[w for w in wanted if w not in hrefs]}"


def test_api_page_of_losses_local_documents_every_export(site, browser):
    import bll_ref.losses.local as local

    state, problems = _visit(browser, "api/bll_ref.losses.local.html", "api-losses-local.png")
    assert not problems, f"api/bll_ref.losses.local.html: {problems}"
    missing = [n for n in local.__all__ if f"bll_ref.losses.local.{n}" not in state["ids"]]
    assert not missing, f"the API page lacks entries for {missing}"
    # numpy-style sections (napoleon) become field lists: Eq. 8's Parameters and Returns
    assert "bll_ref.losses.local.bernoulli_eq8" in state["with_fields"], \
        f"bernoulli_eq8 shows no Parameters/Returns fields; documented with fields: {state['with_fields']}"
    assert not state["math_errors"], state["math_errors"]


def test_first_notebook_shows_its_outputs_equations_and_figures(site, browser):
    name = _first_notebook()
    state, problems = _visit(browser, f"notebooks/{name}.html", "notebook-01.png", "notebook-01-figure.png")
    assert not problems, f"notebooks/{name}.html: {problems}"
    assert state["mathjax"] and state["math_nodes"] > 0, f"no equation rendered on notebooks/{name}.html: {state}"
    assert not state["math_errors"], f"TeX errors on notebooks/{name}.html: {state['math_errors']}"
    assert state["images"] > 0, f"notebooks/{name}.html shows no figure"
    assert state["images_decoded"] == state["images"], \
        f"notebooks/{name}.html: only {state['images_decoded']} of {state['images']} images decoded"
