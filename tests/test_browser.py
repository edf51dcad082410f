"""JupyterLab in a real browser: notebook 03's dataset browser and 06's chat panel render, run and answer.

The test starts JupyterLab on 127.0.0.1, drives headless Chromium (Debian's `chromium` package) with Playwright,
runs every cell of the two notebooks as a learner would (Run > Run All Cells), moves the dataset browser's slider,
asks the chat panel a question, and saves screenshots to runs/test-output/browser/. Without Chromium it skips,
unless LLM_SCHOOL_REQUIRE_BROWSER is set (as in .ci/run, which installs it).
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from smoke_chain import fork_through_training

from helpers import ROOT
from helpers.serve import free_port
from helpers.steps import DATASET, INFER

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUTPUT = Path(os.environ.get("LLM_SCHOOL_TEST_OUTPUT", ROOT / "runs" / "test-output")) / "browser"


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements.txt)"
    return "" if CHROMIUM else "no chromium on PATH (Debian: apt-get install chromium; .ci/run does it)"


if _missing() and os.environ.get("LLM_SCHOOL_REQUIRE_BROWSER"):
    raise RuntimeError(f"the browser test is required here but cannot run: {_missing()}")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(_missing()), reason=_missing())]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_chain):
    """Steps 00-05 of the session's cpu-smoke chain, and JupyterLab serving copies of 03 and 06 pointed at them."""
    base = tmp_path_factory.mktemp("browser")
    runs_before = os.environ.get("LLM_SCHOOL_RUNS")
    assert smoke_chain.returncode == 0, smoke_chain.output[-5000:]
    run = fork_through_training(smoke_chain, "browser")
    os.environ["LLM_SCHOOL_RUNS"] = str(run.root.parent)  # JupyterLab's kernels find the run folder here
    served = base / "lab"
    served.mkdir()
    for name in (DATASET.notebook, INFER.notebook):
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        params.source = params.source.replace('PROFILE = "cpu-lab"', 'PROFILE = "cpu-smoke"').replace(
            'RUN_NAME = "cpu-lab"', 'RUN_NAME = "browser"'
        )
        nbformat.write(nb, served / f"{name}.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "LLM_SCHOOL_HEADLESS"}  # a learner's interactive kernel
    # All cells rendered at all times (JupyterLab otherwise detaches cells scrolled out of view mid-test).
    settings = base / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(base / "settings"),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
         f"--LabApp.workspaces_dir={base / 'workspaces'}",
         "--ServerApp.allow_root=True", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=open(base / "lab.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail(f"JupyterLab did not start: {(base / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"url": url, "token": token}
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    if runs_before is None:
        os.environ.pop("LLM_SCHOOL_RUNS", None)
    else:
        os.environ["LLM_SCHOOL_RUNS"] = runs_before


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        print("browser:", CHROMIUM, chromium.version)
        yield chromium
        chromium.close()


def open_and_run_all(browser, lab, notebook: str):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(f"{lab['url']}/lab/tree/{notebook}.ipynb?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.get_by_text("| Idle").wait_for(timeout=120_000)  # the status bar: the kernel has started
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
    try:  # JupyterLab sometimes still asks which kernel to use: take the notebook's own
        page.locator(".jp-Dialog button.jp-mod-accept").click(timeout=5_000)
    except PlaywrightTimeout:
        pass
    return page


def output(page, text: str):
    """A cell output holding `text` (the code cell that prints it holds it too)."""
    return page.locator(".jp-OutputArea-output", has_text=text)


def test_dataset_browser_renders_and_follows_the_slider(browser, lab):
    page = open_and_run_all(browser, lab, "03_format_white_rabbit")
    widget = page.locator(".llm-school-dataset-browser")
    widget.wait_for(timeout=180_000)
    output(page, "03 self-check passed").wait_for(timeout=180_000)
    widget.scroll_into_view_if_needed()
    summary = widget.locator(".widget-html").first
    summary.get_by_text("trained").wait_for()
    first = summary.text_content()
    assert "tokens" in first and "trained" in first
    widget.locator(".noUi-handle").first.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "([el, before]) => el.textContent !== before", arg=[summary.element_handle(), first], timeout=30_000
    )
    assert widget.locator("span[title='end of turn: trained']").count() == 1, "the mask marks the end-of-turn token"
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=str(OUTPUT / "03_dataset_browser.png"))
    page.screenshot(path=str(OUTPUT / "03_notebook.png"))
    assert page.locator(".jp-OutputArea-output").count() > 5, "cell outputs appear"
    page.close()


def test_chat_panel_answers_a_typed_question(browser, lab):
    page = open_and_run_all(browser, lab, INFER.notebook)
    panel = page.locator(".llm-school-chat-panel")
    panel.wait_for(timeout=240_000)
    output(page, "06 self-check passed").wait_for(timeout=240_000)
    panel.get_by_text("both answered:").wait_for(timeout=120_000)  # the question asked from code
    panel.locator("textarea").first.fill("What is phishing?")
    panel.get_by_role("button", name="Ask both").click()
    panel.get_by_text("both answered: What is phishing?").wait_for(timeout=120_000)
    answers = panel.locator("textarea")
    panel.scroll_into_view_if_needed()
    base, tuned = answers.nth(1).input_value(), answers.nth(2).input_value()
    assert base.strip() and tuned.strip(), "both models answered in the panel"
    panel.screenshot(path=str(OUTPUT / "06_chat_panel.png"))
    page.screenshot(path=str(OUTPUT / "06_notebook.png"))
    page.close()
