"""The page at `/`, clicked through in a real headless browser (chromium driven by Selenium).

The service runs under uvicorn on 127.0.0.1 with the conftest's tiny GMF, its items given
titles ("Film 5", "Film 15", ...), so search, explanations and the session show titles. Where
no chromium and chromedriver are found, the tests are skipped saying how to get them.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from recommender.checkpoint import load_best, save_best
from recommender.inference import Recommender
from recommender.serving import ServeSettings, create_app

USER = "u10"
GET_BROWSER = (
    "no headless browser: `apt-get install chromium chromium-driver` and "
    "`pip install -r requirements-dev.txt` (selenium) to run the page tests"
)


@pytest.fixture(scope="module")
def titled_run(gmf_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GMF run with a title per item, as a run trained on MovieLens has."""
    run = tmp_path_factory.mktemp("page") / "gmf"
    shutil.copytree(gmf_run, run)
    best = load_best(run)
    save_best(run, dataclasses.replace(best, item_titles=[f"Film {i}" for i in best.item_ids]))
    return run


@pytest.fixture(scope="module")
def rec(titled_run: Path) -> Recommender:
    return Recommender.from_run(titled_run)


@pytest.fixture(scope="module")
def base_url(titled_run: Path) -> Iterator[str]:
    """The service on a free port of 127.0.0.1, in a thread of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app = create_app(titled_run, ServeSettings(threads=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started or httpx.get(f"{base}/readyz").status_code != 200:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium through the system chromedriver (no driver is downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason=GET_BROWSER)
    binary = next(filter(None, map(shutil.which, ["chromium", "chromium-browser"])), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(GET_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage"]:
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def texts(browser: Any, css: str) -> list[str]:
    """The text of every element `css` matches, read in one step (the page may re-render)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)"
    return list(browser.execute_script(script, css))


def wait_for(browser: Any, check: Any, timeout: float = 20.0) -> Any:
    """Poll `check(browser)` until truthy; on time-out say what the page's status line said."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(check)
    except TimeoutException:
        status = browser.find_element("id", "status").text
        raise AssertionError(f"page did not get there; status line: {status!r}") from None


def item_titles(browser: Any, list_id: str) -> list[str]:
    return texts(browser, f"#{list_id} li .title")


def test_page_is_served_with_its_assets(base_url: str):
    page = httpx.get(base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/page.js", "/static/page.css"):
        assert asset in page.text and httpx.get(base_url + asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere


def test_model_card_search_user_and_session(base_url: str, browser: Any, rec: Recommender):
    browser.get(base_url + "/")
    info = httpx.get(base_url + "/v1/model").json()
    card = lambda b: b.find_element("css selector", '#model-card dd[data-field="version"]')  # noqa: E731
    wait_for(browser, lambda b: card(b).text == info["version"])
    assert "gmf" in browser.find_element("id", "model-card").text

    # Search by title: every hit contains the query, most popular first.
    browser.find_element("id", "search").send_keys("film 115")
    wait_for(browser, lambda b: set(item_titles(b, "search-results")) == {"Film 115", "Film 1155"})
    assert item_titles(browser, "search-results") == [
        f"Film {i}" for i in rec.search_items("film 115")
    ]

    # Pick a user by clicking one of the most active users.
    first_user = rec.most_active_users(1)[0]
    browser.find_element("css selector", "#users .chip").click()
    wait_for(browser, lambda b: len(item_titles(b, "user-recs")) == 10)
    expected, _ = rec.recommend(first_user, k=10)
    assert item_titles(browser, "user-recs") == [f"Film {i}" for i in expected]
    shown_history = item_titles(browser, "history")
    assert sorted(shown_history) == sorted(f"Film {i}" for i in rec.user_history(first_user))
    whys = texts(browser, "#user-recs .why")
    assert len(whys) == 10 and all(w.startswith("because you liked Film ") for w in whys)
    cited = {w.split(" (+")[0].removeprefix("because you liked ") for w in whys}
    assert cited <= set(shown_history)
    assert set(texts(browser, "#history li.supports .title")) >= cited  # highlighted
    assert f"user={first_user}" in browser.current_url

    # Or type one in.
    user_box = browser.find_element("id", "user")
    user_box.clear()
    user_box.send_keys(USER + "\n")
    expected, _ = rec.recommend(USER, k=10)
    wanted = [f"Film {i}" for i in expected]
    wait_for(browser, lambda b: item_titles(b, "user-recs") == wanted)

    # A session: click a search hit, then one of the session's own recommendations.
    browser.find_element("css selector", "#search-results li .item").click()
    session = [str(rec.search_items("film 115")[0])]
    wanted = [f"Film {i}" for i in rec.similar_to_items(session, k=10)[0]]
    wait_for(browser, lambda b: item_titles(b, "session-recs") == wanted)
    browser.find_element("css selector", "#session-recs li .item").click()
    session.append(wanted[0].removeprefix("Film "))
    wanted = [f"Film {i}" for i in rec.similar_to_items(session, k=10)[0]]
    wait_for(browser, lambda b: item_titles(b, "session-recs") == wanted)
    assert texts(browser, "#session .chip") == [f"Film {i}" for i in session]

    # Clicking a session item takes it out again.
    browser.find_element("css selector", "#session .chip").click()
    wanted = [f"Film {i}" for i in rec.similar_to_items(session[1:], k=10)[0]]
    wait_for(browser, lambda b: item_titles(b, "session-recs") == wanted)
    assert browser.find_element("id", "status").text == ""


def test_a_link_with_a_user_opens_on_their_recommendations(base_url: str, browser: Any):
    browser.get(f"{base_url}/?user={USER}")
    wait_for(browser, lambda b: len(item_titles(b, "user-recs")) == 10)
    mark = browser.execute_script(
        "return performance.getEntriesByName('first-recommendations')[0].startTime"
    )
    assert 0 < mark < 20_000  # ms from navigation to the first list on screen

    browser.get(f"{base_url}/?user=stranger")
    wait_for(browser, lambda b: "unknown user" in b.find_element("id", "user-note").text)
    assert "not seen" in browser.find_element("id", "history-note").text
    assert texts(browser, "#user-recs .why")[0] == "popular with all users"
