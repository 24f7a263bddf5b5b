"""End-to-end: JupyterLab in Debian's Chromium (driven by Playwright) runs the first notebook and lab 04.

Starts a private JupyterLab on a free loopback port with a random token, over a temporary copy of
``notebooks/``, opens ``00_start_here.ipynb`` in Chromium, runs all cells from the Run menu, waits
for the kernel, and checks that every code cell ran, no cell printed a traceback, and the ipywidgets
rendered in the page (so the widget front end and the kernel side agree). In lab 04 it then picks 3 stages and
presses Run, and checks that the pool ran the new pipeline and its timeline appeared. A tiny notebook that
fails on purpose checks that the checks themselves can fail.

Needs ``/usr/bin/chromium`` (``bash .ci/install_browser.sh`` installs Debian's package); skips with
that reason otherwise. Playwright never downloads a browser here: it is given Chromium's path.
Screenshots land in the test's temporary folder (printed on failure).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from labkit.classroom import free_port

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "00_start_here.ipynb"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show


def _write_settings(settings: Path) -> None:
    """User settings for this private Lab: all cells in the DOM, no news or update checks."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
    }
    for rel, value in files.items():
        p = settings / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(value))


def _broken_notebook(path: Path) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[
        new_code_cell("import ipywidgets as widgets\nwidgets.Button(description='press me')"),
        new_code_cell("print('before the error')"),
        new_code_cell("1 / 0"),
        new_code_cell("print('never runs')"),
    ])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, str(path))


def _need_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (bash .ci/install_browser.sh) "
                    f"to run the browser test")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A private JupyterLab server over a copy of notebooks/; yields (base_url, token, root)."""
    _need_chromium()
    if not (REPO / "notebooks" / NOTEBOOK).is_file():
        pytest.skip(f"notebooks/{NOTEBOOK} does not exist yet")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    _broken_notebook(root / "zz_broken_on_purpose.ipynb")
    _write_settings(tmp / "settings")
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    env.pop("MPLBACKEND", None)
    log = open(tmp / "jupyterlab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
         "--allow-root"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}; see {tmp / 'jupyterlab.log'}:\n"
                                   + (tmp / "jupyterlab.log").read_text(errors="replace")[-2000:])
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer on {base} within 300 s; see {tmp / 'jupyterlab.log'}")
            time.sleep(0.5)
        yield base, token, tmp
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (it shuts its kernels down), then its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # Jupyter asks for confirmation on the first SIGINT unless
        try:                             # stdin is not a terminal: then it stops, closing kernels
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group we created
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def run_all(browser, base: str, token: str, notebook: str, shot: Path, wait_s: float = 200, then=None) -> dict:
    """Open ``notebook`` in Lab, Run > Run All Cells, wait for the kernel; return what the page shows.

    ``then(page)``, if given, runs after that (the page still open) and its return value is kept under "then"."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    try:
        # a fresh workspace per notebook, so Lab does not reopen the previous one beside it
        workspace = re.sub(r"\W", "-", Path(notebook).stem)
        page.goto(f"{base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={token}",
                  wait_until="domcontentloaded", timeout=60_000)
        page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=240_000)
        # a kernel chooser only appears if the notebook names no kernel: accept the default
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        page.wait_for_timeout(500)
        if accept.count():
            accept.first.click()
        # the kernel is connected once the status bar reads "<kernel name> | Idle"
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]"
            ".some(e => /\\|\\s*Idle/.test(e.textContent))", timeout=240_000)
        prompts_js = "els => els.map(e => e.textContent.trim())"
        for _attempt in range(3):  # Run > Run All Cells; retry if the click came before the kernel was ready
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator('.lm-Menu-item[data-command="runmenu:run-all"], '
                         '.lm-Menu-item[data-command="notebook:run-all-cells"]').first.click()
            started = False
            for _ in range(20):
                page.wait_for_timeout(500)
                prompts = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell .jp-InputPrompt", prompts_js)
                if any(any(ch.isdigit() or ch == "*" for ch in p) for p in prompts):
                    started = True
                    break
            if started:
                break
        else:
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"Run All Cells did not start {notebook}; screenshot {shot}")
        wait_idle(page, notebook, shot, wait_s)
        after = then(page) if then else None
        cells = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell", """els => els.map(c => ({
            prompt: (c.querySelector('.jp-InputPrompt') || {textContent: ''}).textContent.trim(),
            outputs: [...c.querySelectorAll('.jp-OutputArea-output')].map(o => ({
                mime: o.getAttribute('data-mime-type') || '', text: o.textContent}))}))""")
        widgets = page.locator(", ".join(f"{PANEL} {w}" for w in (
            ".jupyter-widgets", ".widget-button", ".widget-slider", ".widget-dropdown"))).count()
        bad = page.locator(f'{PANEL} .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        if bad.count():  # show the first error output in the screenshot
            bad.first.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
        return {"cells": cells, "prompts": [c["prompt"] for c in cells], "widgets": widgets,
                "page_errors": page_errors, "then": after}
    finally:
        page.close()


def wait_idle(page, notebook: str, shot: Path, wait_s: float) -> None:
    """Wait until no cell is queued or running and the kernel is idle."""
    deadline = time.monotonic() + wait_s
    while True:
        page.wait_for_timeout(1000)
        prompts = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell .jp-InputPrompt",
                                            "els => els.map(e => e.textContent)")
        busy = any("*" in t for t in prompts)
        idle = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count() > 0
        if idle and not busy:
            page.wait_for_timeout(1500)  # let widget views finish rendering
            return
        if time.monotonic() > deadline:
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"{notebook} still running after {wait_s:.0f} s (prompts {prompts}); "
                                 f"screenshot {shot}")


def problems(seen: dict) -> list[str]:
    """Everything that says the run went wrong: unrun cells, tracebacks, widgets that failed to show."""
    out = []
    unrun = [c["prompt"] for c in seen["cells"] if not any(ch.isdigit() for ch in c["prompt"])]
    if unrun:
        out.append(f"{len(unrun)} code cell(s) did not run (prompts {unrun})")
    for cell in seen["cells"]:
        for o in cell["outputs"]:
            t = o["text"]
            if o["mime"] == "application/vnd.jupyter.stderr" and (
                    "Traceback (most recent call last)" in t or re.search(r"^\w*(Error|Exception):", t, re.M)):
                everything = "\n".join(x["text"] for x in cell["outputs"]).strip()
                out.append(f"error output in cell {cell['prompt']}:\n{everything[-1500:]}")
            if "Error displaying widget" in t:
                out.append(f"a widget failed to display in cell {cell['prompt']}: {t.strip()[:200]}")
    return out


@pytest.mark.timeout(600)
def test_start_here_runs_in_jupyterlab_with_widgets(lab, browser):
    base, token, tmp = lab
    shot = tmp / "00_start_here.png"
    seen = run_all(browser, base, token, NOTEBOOK, shot)
    found = problems(seen)
    assert not found, f"{NOTEBOOK} in JupyterLab: " + "\n".join(found) + f"\nscreenshot: {shot}"
    assert seen["prompts"], f"no code cells found; screenshot: {shot}"
    assert seen["widgets"] >= 1, f"no ipywidget rendered in the page; screenshot: {shot}"


def press_pipeline_run(page, shot: Path, wait_s: float = 150) -> dict:
    """In lab 04: choose 3 stages, press Run, and wait until the Output widget shows the new run's timeline."""
    box = page.locator(f"{PANEL} .widget-vbox").filter(has=page.locator(".widget-button", has_text="Run")).first
    box.scroll_into_view_if_needed()
    box.locator(".widget-dropdown").filter(has_text="stages").locator("select").select_option("3")
    box.locator(".widget-button", has_text="Run").click()
    text = ""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # p = 3, m = 4: the bubble in theory is (p-1)/(m+p-1) = 33.3%
        page.wait_for_timeout(1000)
        text = box.locator(".widget-output").inner_text()
        if "theory 33.3%" in text:
            break
    page.wait_for_timeout(1500)
    box.screenshot(path=str(shot))
    out = box.locator(".widget-output")
    return {"text": text, "images": out.locator("img").count(),
            "errors": out.locator('[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()}


@pytest.mark.timeout(900)
def test_pipeline_lab_widgets_run_and_draw(lab, browser):
    """Lab 04 as a student uses it: run all, pick 3 stages, press Run; the pool runs it and the timeline appears."""
    base, token, tmp = lab
    shot, widget_shot = tmp / "04_pipeline.png", tmp / "04_pipeline_widget.png"
    seen = run_all(browser, base, token, "04_pipeline.ipynb", shot, wait_s=300,
                   then=lambda page: press_pipeline_run(page, widget_shot))
    found = problems(seen)
    assert not found, "04_pipeline.ipynb in JupyterLab: " + "\n".join(found) + f"\nscreenshot: {shot}"
    pressed = seen["then"]
    assert "theory 33.3%" in pressed["text"], (f"pressing Run with 3 stages did not show the 3-stage run: "
                                               f"{pressed['text'][-500:]!r}; screenshot {widget_shot}")
    assert pressed["images"] >= 1, f"no timeline image in the widget's output; screenshot {widget_shot}"
    assert not pressed["errors"], f"error output after pressing Run: {pressed['errors']}; screenshot {widget_shot}"


@pytest.mark.timeout(600)
def test_the_checks_catch_a_failing_notebook(lab, browser):
    base, token, tmp = lab
    shot = tmp / "broken.png"
    seen = run_all(browser, base, token, "zz_broken_on_purpose.ipynb", shot, wait_s=90)
    found = problems(seen)
    assert any("ZeroDivisionError" in f for f in found), (found, seen)
    assert any("did not run" in f for f in found), found  # Run All stops at the error
    assert seen["widgets"] >= 1, f"the button should render; screenshot: {shot}"


@pytest.mark.timeout(600)
def test_offline_deck_opens_in_chromium(browser, tmp_path):
    """The 00_course deck built against a local reveal.js works from disk.

    Tests never download: the copy comes from the install step (`.ci/run` runs
    `labkit.slides.fetch_reveal()`), and the test skips when it is not there."""
    from labkit import slides

    try:
        reveal = slides.fetch_reveal(npm="/nonexistent/npm")  # the cached copy only, never the network
    except slides.SlideBuildError:
        pytest.skip(f"no cached reveal.js in {slides.cache_dir()}: run "
                    f"`python -c \"import labkit.slides as s; s.fetch_reveal()\"` once (needs npm and its registry)")
    (path,) = slides.build(["00_course"], out_dir=tmp_path, execute=False, reveal=reveal, quiet=True)
    counts = slides.slide_counts(slides.read_deck(slides.find_decks("00_course")[0]))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the page may ask the network only for MathJax; block it so the test is the same offline
    page.route("http*://**", lambda route: route.abort())
    try:
        page.goto(path.as_uri(), wait_until="load", timeout=60_000)
        page.wait_for_function("window.Reveal && Reveal.isReady()", timeout=30_000)
        total = page.evaluate("Reveal.getTotalSlides()")
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(300)
        index = page.evaluate("Reveal.getIndices()")
        page.screenshot(path=str(tmp_path / "deck.png"))
    finally:
        page.close()
    assert total == counts["slides"] + counts["subslides"], (total, counts)
    assert index["h"] == 1, index
    assert not errors, errors
