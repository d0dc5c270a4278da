"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver, through Selenium): a
reply streams into #messages, the conversation carries on, and Stop aborts the stream so the server cancels."""
from __future__ import annotations

import os
import shutil

import httpx
import pytest

from _serve_util import Throttle, live_server, metrics
from overspill.generate.engine import Engine

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and os.path.exists(p)),
              None)
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def test_chat_page_streams_keeps_the_conversation_and_stops(browser):
    throttle = Throttle(None)

    def engine(model, observer=None, **kw):
        throttle.inner = observer
        return Engine(model, observer=throttle, **kw)

    with live_server(engine_factory=engine, max_batch_size=2) as s:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "shakespeare")
        temp = browser.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("0")
        box, send, stop = (browser.find_element(By.ID, i) for i in ("input", "send", "stop"))

        def bubbles(kind):
            return browser.find_elements(By.CSS_SELECTOR, f"#messages .msg.{kind}")

        box.send_keys("Good morrow, sir. How fare you?")
        send.click()
        wait.until(lambda d: len(bubbles("assistant")) == 1 and bubbles("assistant")[0].text.strip()
                   and send.is_enabled())
        first = bubbles("assistant")[0].text
        assert "tokens" in browser.find_element(By.ID, "rate").text
        assert not bubbles("error")

        # the second turn sends the whole conversation
        alone = httpx.post(s.url + "/tokenize", json={"messages": [{"role": "user", "content": "What say you?"}]})
        before = metrics(s.url)
        box.send_keys("What say you?")
        send.click()
        wait.until(lambda d: len(bubbles("assistant")) == 2 and send.is_enabled())
        sent = metrics(s.url)["overspill_prompt_tokens_total"] - before["overspill_prompt_tokens_total"]
        assert sent > alone.json()["count"] + 10
        assert [b.text for b in bubbles("user")] == ["Good morrow, sir. How fare you?", "What say you?"]
        assert bubbles("assistant")[0].text == first

        # Stop mid-reply: slow the engine down, stop after the first piece arrives
        before = metrics(s.url)
        throttle.delay = 0.4
        box.send_keys("Speak, speak!")
        send.click()
        wait.until(lambda d: len(bubbles("assistant")) == 3 and bubbles("assistant")[2].text.strip())
        assert stop.is_enabled()
        stop.click()
        wait.until(lambda d: "stopped" in bubbles("assistant")[2].get_attribute("class") and send.is_enabled())
        throttle.delay = 0.0
        key = 'overspill_request_finished_total{finish_reason="cancelled"}'
        WebDriverWait(browser, 10).until(lambda d: metrics(s.url)[key] - before.get(key, 0) == 1)
        assert metrics(s.url)["overspill_num_requests_running"] == 0
