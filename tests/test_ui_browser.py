"""`loraedit ui` in a real browser: headless Chromium drives the page as a person would.

A clip from the procedural world and its edited first frame are uploaded, the edit region is
previewed and corrected with a box, a short edit runs on the bundled toy model (CPU), the result
video plays and the LoRA downloads; a file that is not a video shows its one-line error.
Debian's chromium and chromium-driver are used (`make test` installs them as root); nothing is
downloaded. Set LORAEDIT_UI_SCREENSHOTS=docs/ui to refresh the screenshots in docs/ui.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no browser: the test drives Debian's chromium through chromium-driver (apt-get install chromium "
           "chromium-driver; `make test` installs them when run as root)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
pytest.importorskip("gradio", reason="gradio is in the test extra: pip install -e '.[test]'")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "loraedit" / "toymodel"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from loraedit.world import make_clip, write_clip

    clip = make_clip(3, frames=17)
    paths = write_clip(clip, tmp_path_factory.mktemp("world"))
    bad = paths["source"].parent / "holiday.mp4"
    bad.write_text("this is a text file, not a video\n")
    return dict(paths, bad=bad)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`loraedit ui` as a person starts it; the address is read from what it prints."""
    runs = tmp_path_factory.mktemp("runs")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = runs.parent / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loraedit", "ui", "--runs", str(runs), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=runs.parent)
    t0 = time.time()
    url = None
    while time.time() - t0 < 120 and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("loraedit ui: open "):
                url = line.split()[3]
        if url:
            break
        time.sleep(0.2)
    assert url == f"http://127.0.0.1:{port}/", log.read_text()
    yield dict(url=url, runs=runs, log=log)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    # the system driver, given explicitly, so selenium never looks for one to download
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, url: str, shots: Path):
        self.d, self.url, self.shots = driver, url, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self):
        self.d.get(self.url)
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#video input[type=file]"), 60)

    def wait(self, condition, timeout=30, message=""):
        return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(condition, message)

    def text(self, elem_id: str) -> str:
        found = self.d.find_elements(By.ID, elem_id)
        return found[0].text if found else ""

    def wait_text(self, elem_id: str, needle: str, timeout=60) -> str:
        self.wait(lambda d: needle in self.text(elem_id), timeout, f"#{elem_id} never showed {needle!r}")
        return self.text(elem_id)

    def upload(self, elem_id: str, path: Path):
        self.d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))

    def fill(self, elem_id: str, value):
        box = self.d.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)

    def click(self, elem_id: str):
        button = self.d.find_element(By.ID, elem_id)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def shot(self, name: str, elem_id: str):
        """A screenshot of the window with `elem_id` at its top: one step of docs/ui.md."""
        elem = self.d.find_element(By.ID, elem_id)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -10)", elem)
        time.sleep(0.3)
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        wanted = os.environ.get("LORAEDIT_UI_SCREENSHOTS")
        if wanted:
            Path(wanted).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(wanted) / path.name)


def test_bad_upload_shows_its_one_line_error(server, browser, world, tmp_path):
    from loraedit.errors import InputError
    from loraedit.video import probe_video

    page = Page(browser, server["url"], tmp_path / "shots")
    page.open()
    page.upload("video", world["bad"])
    shown = page.wait_text("video-error", "holiday.mp4")
    with pytest.raises(InputError) as cli_error:
        probe_video(world["bad"])  # what `loraedit edit --video holiday.mp4` reports
    assert shown == str(cli_error.value).replace(f"{world['bad'].parent}/", "")
    assert "Traceback" not in browser.page_source
    page.shot("0-bad-upload", "video")


def test_edit_from_upload_to_download(server, browser, world, tmp_path):
    page = Page(browser, server["url"], tmp_path / "shots")
    page.open()
    d = browser

    # 1. the video: the frames that will be edited, with the CLI's frame selection
    page.fill("frames", 17)
    page.fill("size", "128x128")
    page.upload("video", world["source"])
    info = page.wait_text("video-info", "editing 17 frames at 128×128")
    assert "source frames 0…16" in info
    page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#frames-gallery img")) == 17, 30, "gallery of 17 frames")
    page.shot("1-video", "video")

    # 2. the edited first frame
    page.upload("first-upload", world["first_frame"])
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#first-upload img"), 30, "uploaded frame shown")
    time.sleep(1)
    page.shot("2-first-frame", "first-upload")

    # 3. the region found from the edit, then corrected with a box drawn on frame 0
    page.click("preview-button")
    region = page.wait_text("region-info", "from automatic", 90)
    assert "%" in region
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay video") and d.find_elements(By.CSS_SELECTOR, "#region-sheet img"), 30)
    page.shot("3-region", "region-source")
    frame0 = d.find_element(By.CSS_SELECTOR, "#frame0 img")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", frame0)
    w, h = frame0.size["width"], frame0.size["height"]
    for (fx, fy), shown in (((0.15, 0.2), "first corner at"), ((0.75, 0.8), "added")):  # offsets from the image's centre
        ActionChains(d).move_to_element_with_offset(frame0, int((fx - 0.5) * w), int((fy - 0.5) * h)).click().perform()
        page.wait_text("corner-info", shown, 20)
    page.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#boxes textarea, #boxes input").get_attribute("value").count(",") == 3,
              20, "a box from two clicks")
    x0, y0, x1, y1 = (int(v) for v in d.find_element(By.CSS_SELECTOR, "#boxes textarea, #boxes input").get_attribute("value").split(","))
    assert 10 <= x0 < 30 and 15 <= y0 < 35 and 85 <= x1 < 105 and 95 <= y1 < 115, (x0, y0, x1, y1)  # of 128×128
    page.click("preview-button")
    page.wait_text("region-info", "from box", 90)
    page.shot("4-region-box", "region-source")
    # back to the region found from the edit (the box covers most of this small frame)
    d.find_element(By.CSS_SELECTOR, "#region-source input[value='found from the edit']").click()
    page.wait_text("region-info", "from automatic", 90)

    # 4. model and a short training
    page.click("toy-model")
    page.wait(lambda d: d.find_element(By.CSS_SELECTOR, "#model input, #model textarea").get_attribute("value").endswith("toymodel"))
    page.fill("prompt", "a blue shape moving on a purple background")
    page.fill("steps", 12)
    page.fill("ref-steps", 0)
    page.fill("render-steps", 4)
    device = d.find_element(By.CSS_SELECTOR, "#device input")
    device.send_keys(Keys.CONTROL, "a")
    device.send_keys("cpu", Keys.ENTER)
    time.sleep(0.5)
    page.shot("5-settings", "model")
    page.click("start-button")

    # 5. progress: the run's job runs in the background worker
    page.wait_text("status", "job 0001 (edit)", 60)
    t0 = time.time()
    def late_in_training(d):
        m = re.search(r"step (\d+)/12", page.text("status"))
        return (m and int(m.group(1)) >= 6) or d.find_elements(By.CSS_SELECTOR, "#result-video video")

    page.wait(late_in_training, 120)
    if "training" in page.text("status"):
        page.shot("6-progress", "status")

    # 6. the result plays, and the LoRA downloads
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#result-video video"), 150, "result video")
    page.wait_text("status", "edit finished", 60)
    seconds = time.time() - t0
    video = d.find_element(By.CSS_SELECTOR, "#result-video video")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].muted = true; arguments[0].play()", video)
    page.wait(lambda d: d.execute_script("return arguments[0].currentTime", video) > 0, 20, "the result video plays")
    duration = d.execute_script("return arguments[0].duration", video)
    assert duration > 0
    d.execute_script("arguments[0].pause(); arguments[0].currentTime = 0.6", video)
    page.shot("7-result", "render-pick")
    links = [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, "#downloads a")]
    run = sorted(p for p in server["runs"].iterdir() if p.is_dir() and not p.name.startswith("."))[-1]
    lora_link = next(href for href in links if href.endswith("/pytorch_lora_weights.safetensors"))
    with urllib.request.urlopen(lora_link, timeout=30) as response:
        body = response.read()
    assert body == (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    from safetensors.torch import load

    assert any("lora_A" in k for k in load(body))
    assert any(href.endswith("/edited.mp4") for href in links)

    # the run folder is an ordinary one: the CLI sees it as finished
    from loraedit.jobqueue import run_jobs

    assert [j.state for j in run_jobs(run)] == ["done"]
    assert (run / "render" / "edited.mp4").is_file() and (run / "job.json").is_file()

    # 7. leave and come back: a fresh page shows the run and lists it
    page.open()
    page.wait_text("status", "edit finished", 30)
    page.click("runs-refresh")
    page.wait_text("runs", run.name, 30)
    page.shot("8-runs", "runs-pick")
    print(f"edit in the browser: {seconds:.0f} s from start to result")
