"""Look at the demo's UIs in a real headless Chromium: log in to Airflow and check a DAG run's state, open the
MLflow experiment and check it lists runs with metrics, open a trajectory's trace and find its judge's rationale;
save screenshots.

    python scripts/ui_check.py AIRFLOW_URL PASSWORD MLFLOW_URL DAG_ID OUT_DIR [EXPERIMENT]
    python scripts/ui_check.py chains AIRFLOW_URL PASSWORD DAG_ID RUN_ID TASK_ID OUT_DIR   (the README's picture)

Used by tests/test_ui.py and to make the README's screenshots. Needs Debian's chromium + chromium-driver and
the selenium package.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(flag)
    from selenium.common.exceptions import WebDriverException

    for attempt in range(3):  # a cold Chromium sometimes misses chromedriver's start-up deadline
        try:
            return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        except WebDriverException:
            if attempt == 2:
                raise
            time.sleep(2)


def wait_text(driver, texts: list[str], timeout: float = 60) -> str:
    """Wait until the page shows one of ``texts``; returns the page text."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = driver.find_element("tag name", "body").text
        except (StaleElementReferenceException, NoSuchElementException):  # the page is navigating (redirect)
            body = ""
        if any(t in body for t in texts):
            return body
        time.sleep(1)
    raise AssertionError(f"none of {texts} on {driver.current_url} after {timeout:.0f} s; page text: {body[:500]}")


def screenshot(driver, path: Path) -> None:
    """Save a screenshot, creating the folder; selenium only returns False when it cannot write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise OSError(f"could not write screenshot {path}")


def login_airflow(driver, base: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    for attempt in range(3):  # the login form can re-render (or the page still redirect) under our hands
        try:
            driver.get(f"{base}/")
            wait_text(driver, ["Sign in", "Username", "username"])
            driver.find_element(By.NAME, "username").send_keys("admin")
            driver.find_element(By.NAME, "password").send_keys(password)
            driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            break
        except (StaleElementReferenceException, NoSuchElementException):
            if attempt == 2:
                raise
            time.sleep(2)
    wait_text(driver, ["Dags", "DAGs", "dags"])


def check_airflow(driver, base: str, password: str, dag_id: str, out: Path) -> str:
    login_airflow(driver, base, password)
    driver.get(f"{base}/dags/{dag_id}/runs")
    body = wait_text(driver, ["success", "Success"])
    time.sleep(2)  # let the grid settle for the screenshot
    screenshot(driver, out / f"airflow-{dag_id}.png")
    return body


def capture_chains(driver, base: str, password: str, dag_id: str, run_id: str, task_id: str, out: Path) -> Path:
    """The README's picture of an experiment: one run's grid with its chain groups opened, beside the mapped
    instances of one chain step (``task_id``), each named by its model, latest first."""
    from selenium.webdriver.common.by import By

    login_airflow(driver, base, password)
    quoted = urllib.request.quote(run_id, safe="")
    driver.get(f"{base}/dags/{dag_id}/runs/{quoted}/tasks/{task_id}/mapped")
    wait_text(driver, ["Map Index", "Map index", "map index"])
    time.sleep(2)
    toggles = 'span[aria-label="Toggle group"]'
    for i in range(len(driver.find_elements(By.CSS_SELECTOR, toggles))):  # found anew: each click re-renders
        driver.find_elements(By.CSS_SELECTOR, toggles)[i].click()  # open each task group (a chain) in the grid
        time.sleep(1)
    for _ in range(2):  # sorted by start date, latest first: the chains' names by model at the top
        driver.find_element(By.XPATH, "//th[contains(., 'Start Date')]").click()
        time.sleep(1)
    time.sleep(2)
    path = out / f"airflow-{dag_id}-chains.png"  # beside, not over, check_airflow's airflow-<dag>.png
    screenshot(driver, path)
    return path


def check_mlflow(driver, base: str, experiment: str, out: Path) -> str:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
    with urllib.request.urlopen(req, timeout=30) as r:
        exp_id = json.load(r)["experiment"]["experiment_id"]
    driver.get(f"{base}/#/experiments/{exp_id}/runs")
    body = wait_text(driver, ["Run Name", "Run name", "run name"])
    time.sleep(3)
    _tidy_mlflow(driver)
    screenshot(driver, out / f"mlflow-{experiment}.png")
    return body


def check_mlflow_trace(driver, base: str, experiment_id: str, trace_id: str, expect: str, out: Path) -> str:
    """Open one trace in the MLflow UI, show its assessments with their rationales, wait for ``expect`` (e.g. the
    start of the judge's rationale) and save ``mlflow-trace.png``; returns the page text."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    driver.set_window_size(1600, 1000)
    driver.get(f"{base}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}")
    wait_text(driver, ["Assess"])
    time.sleep(2)
    for button in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel."
                                                        "close']"):
        try:  # the assistant panel covers the trace's right side
            button.click()
        except WebDriverException:
            pass
    next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.startswith("Assess")).click()
    wait_text(driver, ["Assessments"])
    for button in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='shared.model-trace-explorer."
                                                        "toggle-assessment-expanded']"):
        button.click()  # each assessment's value, source and rationale
        time.sleep(0.3)
    body = wait_text(driver, [expect], timeout=30)
    time.sleep(1)
    screenshot(driver, out / "mlflow-trace.png")
    return body


def _tidy_mlflow(driver) -> None:
    """For a readable screenshot: close the assistant side panel and expand the parent runs' nested runs.
    Best effort: the check itself does not depend on it."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
            button.click()
        for row in driver.find_elements(By.CSS_SELECTOR, ".ag-row"):
            for button in row.find_elements(By.CSS_SELECTOR, "button.du-bois-light-btn-icon-only"):
                button.click()
        time.sleep(2)
    except WebDriverException:
        pass


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "chains":  # chains AIRFLOW_URL PASSWORD DAG_ID RUN_ID TASK_ID OUT_DIR
        airflow, password, dag_id, run_id, task_id, out = argv[2:8]
        driver = browser()
        try:
            print(f"screenshot: {capture_chains(driver, airflow, password, dag_id, run_id, task_id, Path(out))}")
        finally:
            driver.quit()
        return 0
    airflow, password, mlflow, dag_id, out = argv[1:6]
    experiment = argv[6] if len(argv) > 6 else "training"
    out_dir = Path(out)
    driver = browser()
    try:
        check_airflow(driver, airflow, password, dag_id, out_dir)
        check_mlflow(driver, mlflow, experiment, out_dir)
    finally:
        driver.quit()
    print(f"screenshots in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
