#!/usr/bin/env python3
"""The dashboard in a real browser: `ambient demo --dashboard` with four simulated devices,
loaded in headless Chromium through chromedriver (W3C WebDriver, standard library only).

Checks that every node the coordinator knows is rendered with its id, that a completed task
shows in the feed, and that the device the demo overheats turns red with its reason. Saves
screenshots (desktop and phone width) under target/. Exits non-zero on any failure.

    python3 tests/browser/dashboard.py [path/to/ambient]

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium
chromium-driver); `tests/browser/run.sh` installs them and builds `ambient` first.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "target")
DEADLINE_S = 90


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, deadline_s=DEADLINE_S):
    """Polls `check` until it returns something truthy; fails naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.25)
    raise SystemExit(f"FAIL: {what} (last seen: {last!r})")


class Driver:
    """The few WebDriver commands the check needs."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1280,1500"],
                    },
                }
            }
        }
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["value"]

    def cmd(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def js(self, script):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))
        print(f"screenshot: {os.path.relpath(path, ROOT)}")

    def quit(self):
        try:
            self.call("DELETE", f"/session/{self.session}")
        except OSError:
            pass


def main():
    ambient = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/ambient")
    for path in (ambient, "/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"FAIL: {path} is missing (run tests/browser/run.sh)")
    os.makedirs(OUT, exist_ok=True)
    procs = []
    driver = None
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "demo.log"), "w+")
        try:
            demo = subprocess.Popen(
                [ambient, "demo", "--tasks", "40", "--data-dir", os.path.join(tmp, "demo"),
                 "--dashboard", "127.0.0.1:0"],
                stdout=subprocess.DEVNULL, stderr=log)
            procs.append(demo)

            def dashboard_url():
                log.seek(0)
                m = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/", log.read())
                if demo.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"FAIL: the demo exited with {demo.returncode}:\n{log.read()}")
                return m and m.group(1)

            url = wait_for("the demo prints its dashboard URL", dashboard_url)
            print(f"dashboard at {url}/")
            with urllib.request.urlopen(url + "/api/dashboard", timeout=30) as r:
                ids = sorted(n["node"] for n in json.load(r)["nodes"])
            assert len(ids) == 4, ids

            port = free_port()
            chromedriver = subprocess.Popen(["/usr/bin/chromedriver", f"--port={port}"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(chromedriver)
            wait_for("chromedriver answers",
                     lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5))
            driver = Driver(port)
            driver.cmd("POST", "/url", {"url": url + "/"})

            rendered = wait_for(
                "every node is rendered with its id",
                lambda: (lambda got: got if sorted(got) == ids else None)(driver.js(
                    "return [...document.querySelectorAll('[data-node]')]"
                    ".filter(e => e.textContent.includes(e.dataset.node)).map(e => e.dataset.node)")))
            print(f"nodes rendered: {len(rendered)}")
            task = wait_for(
                "a completed task shows in the feed",
                lambda: driver.js(
                    "const r = document.querySelector('#feed tr[data-status=completed]');"
                    "return r && r.textContent"))
            print(f"completed task row: {task}")
            hot = wait_for(
                "the overheated device turns red with its reason",
                lambda: driver.js(
                    "const n = [...document.querySelectorAll('.node.bad')]"
                    ".find(n => /temperature [0-9.]+ °C is over/.test(n.textContent));"
                    "return n && [n.dataset.node, getComputedStyle(n).borderLeftColor,"
                    " n.querySelector('.why').textContent]"))
            print(f"red node {hot[0][:12]}: border {hot[1]}; {hot[2]}")
            assert hot[1] == "rgb(211, 58, 44)", hot
            chart = wait_for("the chart draws bars",
                             lambda: driver.js("return document.querySelectorAll('#chart rect').length"))
            print(f"chart bars: {chart}")
            driver.screenshot(os.path.join(OUT, "dashboard.png"))
            driver.cmd("POST", "/window/rect", {"width": 390, "height": 1600})
            width = driver.js("return document.documentElement.scrollWidth")
            assert width <= 390, f"the page scrolls sideways on a phone: {width}px"
            driver.screenshot(os.path.join(OUT, "dashboard-phone.png"))
            print("PASS: the dashboard renders every node, a completed task and an overheated node")
        finally:
            if driver:
                driver.quit()
            for p in reversed(procs):
                p.send_signal(signal.SIGINT if p is procs[0] else signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
    if demo.returncode != 0:
        raise SystemExit(f"FAIL: the demo exited with {demo.returncode} after Ctrl-C")


if __name__ == "__main__":
    main()
