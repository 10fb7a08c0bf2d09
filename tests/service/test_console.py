"""The web console in a real headless Chromium against `crispedit serve` on the bundled SmolLM2.

Screenshots land in ``test-artifacts/console/`` (or ``$CRISPEDIT_ARTIFACTS``). Without Chromium and
chromedriver the test is skipped, unless ``CRISPEDIT_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, ROOT, free_port, wait_ready

ARTIFACTS = Path(os.environ.get("CRISPEDIT_ARTIFACTS", ROOT / "test-artifacts")) / "console"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.slow

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CRISPEDIT_REQUIRE_BROWSER") == "1":
        raise RuntimeError("CRISPEDIT_REQUIRE_BROWSER=1 but chromium/chromedriver are not installed")
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def console(tmp_path_factory, redis_db):
    tmp = tmp_path_factory.mktemp("console")
    port = free_port()
    env = {**os.environ, "CRISPEDIT_REGISTRY_ROOT": str(tmp / "registry"), "CRISPEDIT_MODELS": "smollm2",
           "CRISPEDIT_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
           "CRISPEDIT_KEY_PREFIX": f"c{uuid.uuid4().hex[:8]}", "CRISPEDIT_CORPUS": str(FIXTURES / "corpus.txt"),
           "CRISPEDIT_CACHE_SAMPLES": "4", "CRISPEDIT_CACHE_SEQ_LEN": "64",
           "CRISPEDIT_API_KEYS": "admin-key:admin,reader-key:reader"}
    log = open(tmp / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=300)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        print((tmp / "serve.log").read_text()[-3000:])


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def connect(browser, url: str, key: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(f"{url}/console")
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.ID, "connect").click()
    from selenium.common.exceptions import StaleElementReferenceException

    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))  # the table re-renders
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#versions tbody tr[data-version='v0']")))
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "smollm2"
    return wait


def fill(browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def row_text(browser, version: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"#versions tbody tr[data-version='{version}']").text


def test_post_watch_compare_and_roll_back_in_the_browser(console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = connect(browser, console, "admin-key")

    # bad input: an empty target gets the API's 422, shown as a message that names the field
    fill(browser, "prompt", "The capital of Zubrowka is")
    browser.find_element(By.ID, "post-edit").click()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert "422" in browser.find_element(By.ID, "error").text and "target" in browser.find_element(By.ID, "error").text

    # a JSONL file with a broken line is refused before anything is posted
    bad = ARTIFACTS / "bad-edits.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": oops}\n')
    browser.find_element(By.ID, "jsonl").send_keys(str(bad))
    browser.find_element(By.ID, "post-file").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "bad-edits.jsonl line 2 is not JSON"))
    assert browser.find_elements(By.CSS_SELECTOR, "#jobs .job") == []

    # post an edit and watch its progress stream until it succeeds
    fill(browser, "target", "Lutz")
    fill(browser, "message", "Zubrowka's capital")
    browser.find_element(By.ID, "post-edit").click()
    WebDriverWait(browser, 900).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#jobs .job .status"), "succeeded"))
    job_log = browser.find_element(By.CSS_SELECTOR, "#jobs .job pre").text
    assert "epoch 1" in job_log and "evaluation: reliability" in job_log and "from v0" in job_log
    epochs = job_log.count("epoch ")
    plotted = browser.find_element(By.CSS_SELECTOR, "#jobs .job svg.loss polyline").get_attribute("points")
    assert len(plotted.split()) == epochs  # the loss curve: one point per epoch
    browser.save_screenshot(str(ARTIFACTS / "1-edit-succeeded.png"))

    # a reload keeps the job: the console lists the model's edits and replays their events
    card = browser.find_element(By.CSS_SELECTOR, "#jobs .job").get_attribute("id")
    browser.refresh()
    wait.until(lambda b: b.find_elements(By.ID, card)
               and "succeeded" in b.find_element(By.CSS_SELECTOR, f"#{card} .status").text)
    assert "Lutz" in browser.find_element(By.ID, card).text
    assert len(browser.find_element(By.CSS_SELECTOR, f"#{card} svg.loss polyline").get_attribute("points").split()) \
        == epochs

    # the new version is in the timeline, with its message, edit and the latest alias
    wait.until(lambda b: "latest" in row_text(b, "v1"))
    assert "Zubrowka's capital" in row_text(browser, "v1") and "Lutz" in row_text(browser, "v1")
    assert "admin" in row_text(browser, "v1")  # the author: the posting key's role and id
    # what else changed: the neighbours' share kept beside the version, each neighbour listed on the job card
    assert re.search(r"\d+ of \d+ \(\d\.\d\d\)", row_text(browser, "v1")), row_text(browser, "v1")
    listed = browser.find_elements(By.CSS_SELECTOR, "#jobs .job ul.neighbours li")
    assert listed and all(li.get_attribute("class") in ("kept", "changed") for li in listed)

    # compare v0 and v1 on the edit's prompt: two different answers, the target far likelier under v1
    Select(browser.find_element(By.ID, "cmp-a")).select_by_visible_text("v0")
    Select(browser.find_element(By.ID, "cmp-b")).select_by_visible_text("v1")
    fill(browser, "cmp-prompt", "The capital of Zubrowka is")
    fill(browser, "cmp-target", "Lutz")
    browser.find_element(By.ID, "compare").click()
    WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#cmp-out .prob")) == 2)
    answers = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#cmp-out .answer")]
    probs = [float(e.text.rsplit("= ", 1)[1]) for e in browser.find_elements(By.CSS_SELECTOR, "#cmp-out .prob")]
    assert answers[0] != answers[1] and "Lutz" in answers[1] and "Lutz" not in answers[0], answers
    assert probs[1] > 100 * probs[0], probs
    browser.save_screenshot(str(ARTIFACTS / "2-compare-v0-v1.png"))

    # promote v1 to production (confirmed), then roll back to v0: latest and production both move there
    v1 = browser.find_element(By.CSS_SELECTOR, "#versions tbody tr[data-version='v1']")
    v1.find_element(By.CSS_SELECTOR, "input.alias-name").send_keys("production")
    v1.find_element(By.CSS_SELECTOR, "button.move-alias").click()
    alert = wait.until(ec.alert_is_present())
    assert "Point smollm2@production at v1" in alert.text
    alert.accept()
    wait.until(lambda b: "production" in row_text(b, "v1"))
    v0 = browser.find_element(By.CSS_SELECTOR, "#versions tbody tr[data-version='v0']")
    v0.find_element(By.CSS_SELECTOR, "button.rollback").click()
    alert = wait.until(ec.alert_is_present())
    assert "Roll smollm2 back to v0" in alert.text
    alert.accept()
    wait.until(lambda b: "production" in row_text(b, "v0"))
    assert "latest" in row_text(browser, "v0")
    browser.save_screenshot(str(ARTIFACTS / "3-rolled-back.png"))
    aliases = httpx.get(f"{console}/v1/registry/smollm2/versions",
                        headers={"Authorization": "Bearer admin-key"}).json()["aliases"]
    assert aliases["latest"] == aliases["production"] == "v0"


def test_reader_cannot_roll_back_and_is_told_why(console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = connect(browser, console, "reader-key")
    browser.find_element(By.CSS_SELECTOR, "#versions tbody tr[data-version='v0'] button.rollback").click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(ec.visibility_of_element_located((By.ID, "error")))
    assert "403" in browser.find_element(By.ID, "error").text
    browser.save_screenshot(str(ARTIFACTS / "4-reader-refused.png"))


def test_a_rejected_edit_shows_the_guard_figures(console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    connect(browser, console, "admin-key")
    fill(browser, "prompt", "The capital of Zubrowka is")
    fill(browser, "target", "Lutz")
    fill(browser, "kl-budget", "1e-12")  # no real edit stays under this drift: the guard must say no
    browser.find_element(By.ID, "post-edit").click()
    WebDriverWait(browser, 900).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#jobs .job .status"), "rejected"))
    assert "evaluation: reliability" in browser.find_element(By.CSS_SELECTOR, "#jobs .job pre").text
    reason = browser.find_element(By.CSS_SELECTOR, "#jobs .job .reason").text
    assert reason.startswith("rejected: capability drift KL") and "exceeds the budget 1e-12" in reason, reason
    browser.save_screenshot(str(ARTIFACTS / "5-rejected-by-the-guard.png"))
