"""The admin page at /ui in a real headless Chromium (Debian's `chromium` and `chromium-driver` packages, driven
with selenium through the system chromedriver: nothing is downloaded) against a live server with API keys.

It loads, lists what the API lists, uploads (file input and a synthetic drop) and deletes through the page
(the store changes), shows live metrics, and answers an inference key's admin action with the 403 message.
A screenshot is written to tests/artifacts/admin-page.png."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import upload
from .server import ServerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("the admin-page test needs Debian's chromium and chromedriver: "
                "apt-get install -y chromium chromium-driver (.ci/run installs them in CI)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ADMIN, INFERENCE = "adm-secret", "inf-secret"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def keyed_server(model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("ui") / "store",
                           env={"ADAPTER_SERVICE_API_KEYS": f"admin:{ADMIN},inference:{INFERENCE}"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _listed(server: ServerProcess) -> list[str]:
    return [a["id"] for a in server.client.get("/adapters", headers=_as(ADMIN)).json()["adapters"]]


def _wait(driver, condition, timeout: float = 30, what: str = ""):
    try:
        # The list is re-rendered when it changes: an element found a moment ago may be gone (look again).
        return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        message = driver.find_element(By.ID, "message").text
        raise AssertionError(f"timed out waiting for {what}; the page says: {message!r}") from None


def _rows(driver) -> list[str]:
    return [row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")]


def _use_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()


def _message(driver, contains: str) -> str:
    return _wait(driver, lambda d: contains in (text := d.find_element(By.ID, "message").text) and text,
                 what=f"a message with {contains!r}")


def _click_confirmed(driver, selector: str) -> None:
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True, 10, selector)
    _wait(driver, expected_conditions.alert_is_present(), 10, "the confirmation")
    driver.switch_to.alert.accept()


def _drop(driver, files: dict[str, bytes]) -> None:
    """A drop event on the drop zone carrying these files (built as File objects in the page)."""
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    driver.execute_script("""
        const transfer = new DataTransfer();
        for (const [name, b64] of Object.entries(JSON.parse(arguments[0]))) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          transfer.items.add(new File([bytes], name));
        }
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, json.dumps(encoded))


def test_page_lists_uploads_activates_deletes(keyed_server, browser, adapters) -> None:
    server, driver = keyed_server, browser
    c = server.client
    assert c.get("/ui/").status_code == 200  # the page itself needs no key: it holds no data
    assert c.get("/adapters").status_code == 401
    with httpx.Client(base_url=server.url, headers=_as(ADMIN), timeout=60) as admin:
        assert upload(admin, adapters["alpha"], "alpha").status_code == 201
    driver.get(server.url + "/ui")
    assert driver.title == "adapter-service admin"
    _message(driver, "needs an API key")  # no key yet: the list call is refused, and the page says so

    _use_key(driver, ADMIN)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-adapters") == "1", what="list")
    assert _rows(driver) == _listed(server) == ["alpha"]
    row = driver.find_element(By.CSS_SELECTOR, '#adapters tr[data-id="alpha"]').text
    info = server.client.get("/adapters/alpha", headers=_as(ADMIN)).json()
    assert row.startswith(f"alpha LORA 4 {', '.join(info['target_modules'])} ")  # plain names: shown as they are

    # Upload through the file input (two files), then through a drop.
    driver.find_element(By.ID, "upload-id").send_keys("beta")
    files = [adapters["beta"] / "adapter_config.json", adapters["beta"] / "adapter_model.safetensors"]
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(f) for f in files))
    _message(driver, "Uploaded beta")
    driver.find_element(By.ID, "upload-id").send_keys("gamma")
    _drop(driver, {name: (adapters["gamma"] / name).read_bytes()
                   for name in ("adapter_config.json", "adapter_model.safetensors")})
    _message(driver, "Uploaded gamma")
    assert _listed(server) == ["alpha", "beta", "gamma"] and (server.store / "gamma").is_dir()
    _wait(driver, lambda d: _rows(d) == ["alpha", "beta", "gamma"], what="three rows")

    # Usage and live metrics move with a generation.
    body = {"prompt": "Hello", "adapter_id": "alpha", "max_new_tokens": 8, "ignore_eos": True}
    assert c.post("/generate", json=body, headers=_as(INFERENCE)).status_code == 200
    _wait(driver, lambda d: "1" in d.find_element(By.CSS_SELECTOR, '#adapters tr[data-id="alpha"] td:nth-child(8)')
          .text, what="alpha's request count")
    _wait(driver, lambda d: d.find_element(By.ID, "throughput").text not in ("–", ""), what="throughput")
    assert driver.find_element(By.ID, "queue").text == "0"
    assert driver.find_element(By.ID, "resident-count").text == "3 / 3"
    assert driver.find_element(By.ID, "process-memory").text.endswith("MiB")

    _click_confirmed(driver, '#adapters tr[data-id="alpha"] button.activate')
    _message(driver, "Activated alpha")
    assert c.get("/health", headers=_as(ADMIN)).json()["active_adapter"] == "alpha"

    _click_confirmed(driver, '#adapters tr[data-id="beta"] button.delete')
    _message(driver, "Deleted beta")
    assert _listed(server) == ["alpha", "gamma"] and not (server.store / "beta").exists()
    _wait(driver, lambda d: _rows(d) == ["alpha", "gamma"], what="two rows")
    assert driver.find_element(By.ID, "resident-count").text == "2 / 2"  # the tiles follow the action too

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "admin-page.png"
    driver.save_screenshot(str(shot))
    print(f"admin page screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_inference_key_sees_the_list_but_admin_actions_are_refused(keyed_server, browser, adapters) -> None:
    server, driver = keyed_server, browser
    before = _listed(server)
    assert before, "runs after the test above, on its adapters"
    driver.get(server.url + "/ui/")
    _use_key(driver, INFERENCE)
    _wait(driver, lambda d: _rows(d) == before, what="the list")
    _click_confirmed(driver, f'#adapters tr[data-id="{before[0]}"] button.delete')
    text = _message(driver, "403")
    assert "not allowed with this key" in text and "admin" in text
    driver.find_element(By.ID, "file-input").send_keys(str(adapters["beta"] / "adapter_config.json"))
    assert "403" in _message(driver, "Uploading is not allowed with this key")
    assert _listed(server) == before and (server.store / before[0]).is_dir()
