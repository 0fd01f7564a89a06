"""The labeling page (nanollm/web/label.html served by nanollm/labeling.py) in a real headless Chromium driven by
Selenium: a labeler scores and ranks the replies of two items, each answer is in the labels file at once; the server is
restarted and the page, reloaded, resumes at the third item; a second labeler labels the same items and the report's
agreement matches the hand-computed value. Needs chromium + chromium-driver and selenium (see test_chat_page.py):
skipped without them, except under CI where it fails."""
import json
import threading

from nanollm.labeling import LabelServer, LabelStore, agreement_report
from test_chat_page import browser  # noqa: F401 (the fixture: one headless Chromium for the module)

ITEMS = [{"input": "火星与地球相比有何不同?", "responses": ["火星更冷,大气稀薄。", "不知道。", "火星是红色的。"]},
         {"input": "Say hi.", "responses": ["Hi.", "Hello there, friend.", "No."]},
         {"input": "我在寻找一款轻便耐用的旅行背包,有推荐吗?", "responses": ["建议选30L的轻便背包。", "随便买。", "看容积。"]}]


def serve(store, port=0):
    server = LabelServer(("127.0.0.1", port), store)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()
    server.server_close()


def wait_for_item(driver, item):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20, poll_frequency=0.05).until(lambda d: d.execute_script(
        "return document.body.dataset.item") == item)


def start_as(driver, name, expected_item):
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "labeler")
    field.clear()
    field.send_keys(name)
    driver.find_element(By.ID, "start").click()
    wait_for_item(driver, expected_item)


def label(driver, scores, places, next_item):
    """Choose every reply's scores (scores[dimension][reply]) and place, click Submit, wait for the next item."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for card in driver.find_elements(By.CSS_SELECTOR, "#replies .reply"):
        reply = int(card.get_attribute("data-reply"))
        for dimension, values in scores.items():
            Select(card.find_element(By.CSS_SELECTOR, f'select[data-dimension="{dimension}"]')).select_by_value(
                str(values[reply]))
        Select(card.find_element(By.CSS_SELECTOR, "select.place")).select_by_value(str(places[reply]))
    driver.find_element(By.ID, "submit").click()
    wait_for_item(driver, next_item)


def read_labels(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


SCORES = {"accuracy": [5, 1, 3], "relevance": [5, 2, 4], "naturalness": [4, 5, 4], "conciseness": [3, 5, 5]}


def test_labels_are_written_a_restart_resumes_and_two_labelers_agreement_is_reported(browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    path = str(tmp_path / "labels.jsonl")
    server, base = serve(LabelStore(path, ITEMS))
    port = server.server_address[1]
    try:
        browser.get(base + "/")
        assert browser.execute_script("return document.body.dataset.state") in ("name", "labeling")
        start_as(browser, "ana", "0")
        assert browser.find_element(By.ID, "prompt").text == ITEMS[0]["input"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#replies .reply")) == 3

        # an incomplete answer is refused on the page and nothing is written
        browser.find_element(By.ID, "submit").click()
        assert "score" in browser.find_element(By.ID, "status").text
        label(browser, SCORES, [1, 3, 2], "1")  # places: reply 1 first, reply 3 second -> ranking [1, 3, 2]
        first = read_labels(path)
        assert len(first) == 1 and first[0]["ranking"] == [1, 3, 2] and first[0]["scores"] == SCORES
        assert first[0]["labeler"] == "ana" and first[0]["input"] == ITEMS[0]["input"]
        assert [o["score"] for o in first[0]["outputs"]] == [4.625, 2.15, 3.525]  # 0.6a + 0.15r + 0.125n + 0.125c
        label(browser, SCORES, [2, 1, 3], "2")  # ranking [2, 1, 3]
        assert [record["item"] for record in read_labels(path)] == [0, 1]
    finally:
        stop(server)

    # the server restarts on the same address; the reloaded page remembers the name and resumes at item 2
    server, base = serve(LabelStore(path, ITEMS), port)
    try:
        browser.get(base + "/")
        wait_for_item(browser, "2")
        assert "2 of 3 labeled" in browser.find_element(By.ID, "progress").text
        label(browser, SCORES, [1, 2, 3], "")
        assert browser.execute_script("return document.body.dataset.state") == "finished"

        start_as(browser, "ben", "0")  # a second labeler on the same items and replies
        label(browser, SCORES, [1, 2, 3], "1")  # ranking [1, 2, 3]: vs ana's [1, 3, 2], pairs 1>2, 1>3 agree
        label(browser, SCORES, [2, 1, 3], "2")  # ranking [2, 1, 3]: the same as ana's
    finally:
        stop(server)
    records = read_labels(path)
    assert sorted((r["labeler"], r["item"]) for r in records) == [("ana", 0), ("ana", 1), ("ana", 2), ("ben", 0),
                                                                  ("ben", 1)]
    (a, b, items, agreement, tau), = agreement_report(records)["labelers"]
    # item 0: 2 of 3 pairs agree, τ = (2 - 1) / 3; item 1: 3 of 3, τ = 1
    assert (a, b, items) == ("ana", "ben", 2) and agreement == 5 / 6 and abs(tau - (1 / 3 + 1) / 2) < 1e-12
