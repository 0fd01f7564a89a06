"""The chat page (nanollm/web/chat.html) in a real headless Chromium driven by Selenium: it types a message, clicks
Send and sees the reply appear while it is still being generated, keeps the conversation for the next turn, and
stops an answer with the Stop button. Needs the Debian packages chromium + chromium-driver and `pip install selenium`
(.ci/run installs the browser); without them the test fails under CI (CI is set) and is skipped elsewhere."""
import importlib.util
import os
import shutil
import tempfile
import threading

import pytest

from test_serve import greedy, load, make_checkpoint, start_server, stop_server
from nanollm.serving import Engine

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def require_browser():
    missing = [f"{path} (apt-get install chromium chromium-driver)" for path in (CHROMIUM, CHROMEDRIVER)
               if not os.path.exists(path)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install selenium)")
    if missing:
        message = "the chat page test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs the browser, the test extra installs selenium")
        pytest.skip(message)


class GatedEngine(Engine):
    """Pauses generation after the first piece of text of a reply until the test opens the gate, so the test can
    see that piece on the page while the reply is unfinished. Records every request's messages."""

    def __init__(self, *args, **kwargs):
        self.gate, self.requests = threading.Event(), []
        super().__init__(*args, **kwargs)

    def prepare(self, request):
        self.requests.append(request.messages)
        return super().prepare(request)

    def deliver(self, job, token):
        finished = super().deliver(job, token)
        if job.sent:
            self.gate.wait(timeout=60)
        return finished


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nanollm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path given too, Selenium Manager never downloads
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def assistant_state(driver):
    """(data-state, text, chunks) of the last assistant message on the page."""
    return driver.execute_script("""
        const all = document.querySelectorAll('#messages .message.assistant');
        const last = all[all.length - 1];
        return last ? [last.dataset.state, last.textContent, Number(last.dataset.chunks)] : [null, '', 0];""")


def type_and_send(driver, text):
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_page_streams_a_reply_keeps_the_conversation_and_stops(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = make_checkpoint(tmp_path)
    model, tokenizer = load(checkpoint)
    engine = GatedEngine(model, tokenizer, "tiny", max_batch=4)
    server, base = start_server(engine)
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    try:
        browser.get(base + "/")
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        assert "tiny" in browser.find_element(By.ID, "model").text
        for name, value in (("temperature", "0"), ("max_tokens", "30")):
            field = browser.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)

        # turn 1: the first piece is on the page while the worker is held mid-answer, then the rest streams in
        question = "where does person 3 live?"
        type_and_send(browser, question)
        state, partial, _ = wait.until(lambda d: (s := assistant_state(d))[1] and s)
        assert state == "streaming" and browser.find_element(By.ID, "stop").is_enabled()
        engine.gate.set()
        state, reply, chunks = wait.until(lambda d: (s := assistant_state(d))[0] == "done" and s)
        expected = greedy(model, tokenizer, [{"role": "user", "content": question}], 30)[0]
        assert reply == expected and reply.startswith(partial) and len(reply) > len(partial)
        assert chunks >= 3  # several server-sent events, each shown as it came

        # turn 2: the page sends the whole conversation
        type_and_send(browser, "and person 5?")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2 and
                   assistant_state(d)[0] == "done")
        assert engine.requests[-1] == [{"role": "user", "content": question}, {"role": "assistant", "content": reply},
                                       {"role": "user", "content": "and person 5?"}]

        # turn 3: Stop ends a reply mid-way; the page keeps what arrived and can send again
        engine.gate.clear()
        type_and_send(browser, "where does person 41 live?")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 3 and
                   assistant_state(d)[1])
        browser.find_element(By.ID, "stop").click()
        state, stopped, _ = wait.until(lambda d: (s := assistant_state(d))[0] == "stopped" and s)
        engine.gate.set()
        assert stopped and browser.find_element(By.ID, "send").is_enabled()
        type_and_send(browser, "hello")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 4 and
                   assistant_state(d)[0] == "done")
        assert engine.requests[-1][-2:] == [{"role": "assistant", "content": stopped},
                                           {"role": "user", "content": "hello"}]
    finally:
        engine.gate.set()
        stop_server(server, engine)
