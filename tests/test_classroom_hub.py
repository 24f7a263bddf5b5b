"""The classroom for real on this machine: JupyterHub with the course's own configuration
(``classroom/jupyterhub_config.py``), two students logged in through the login form, both servers running notebook 00
(their hand-out copy) at the same time.

The hub runs on a free loopback port with the dummy authenticator and the simple local spawner (the configuration's
test settings) and two assumed GPUs. The test checks that the hand-out reached each home, that each server got its
own share (the GPU and threads the spawner hook set), and that both notebooks ran to the end with every check saying
"not attempted yet" and their time spans overlapping (the launcher's promise that two students never collide). It
stops every process it started. Skips, saying why, without JupyterHub or configurable-http-proxy
(``bash .ci/install_proxy.sh`` installs the proxy from npm).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "classroom" / "jupyterhub_config.py"
STUDENTS = ("alice", "bob")


@pytest.fixture
def hub(tmp_path):
    """A running hub; yields (url, token, homes). Stops the hub, the proxy, the servers and their kernels."""
    pytest.importorskip("jupyterhub", reason="JupyterHub is not installed (pip install -r requirements.txt)")
    requests = pytest.importorskip("requests")
    from labkit import classroom, grading

    if classroom.proxy_command() is None:
        pytest.skip("configurable-http-proxy is absent: bash .ci/install_proxy.sh installs it from npm")
    import psutil

    course, homes, state = tmp_path / "course", tmp_path / "homes", tmp_path / "state"
    grading.handout(course, ["00"])
    token = secrets.token_hex(16)
    cfg = tmp_path / "hub_test_config.py"
    cfg.write_text(f'''c = get_config()
load_subconfig({str(CONFIG)!r})
c.JupyterHub.services.append({{"name": "labkit-test", "api_token": {token!r}}})
c.JupyterHub.load_roles.append({{"name": "labkit-test", "services": ["labkit-test"],
                                "scopes": ["admin:users", "admin:servers", "access:servers"]}})
''')
    port = classroom.free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LABKIT_HUB_AUTH="dummy", LABKIT_HUB_PASSWORD="pw", LABKIT_HUB_SPAWNER="simple",
               LABKIT_HUB_URL=url, LABKIT_HUB_STATE=str(state), LABKIT_HUB_HOMES=str(homes),
               LABKIT_HUB_STUDENTS="2", LABKIT_GPUS="2", LABKIT_COURSE=str(course), LABKIT_HUB_IDLE="0")
    env.pop("LABKIT_BUSY", None)
    log = open(tmp_path / "hub.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(cfg)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()

    def remember():
        try:
            seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the hub exited ({proc.returncode}):\n"
                                     f"{(tmp_path / 'hub.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/hub/api/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the hub did not answer in 240 s:\n{(tmp_path / 'hub.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, token, homes, remember
    finally:
        remember()
        for name in STUDENTS:  # stop the servers the polite way first: they shut their kernels down
            try:
                requests.delete(f"{url}/hub/api/users/{name}/server", headers={"Authorization": f"token {token}"},
                                timeout=30)
            except requests.RequestException:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        for pid in seen:  # kernels run in sessions of their own: end whatever is left of what the hub started
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        log.close()


def _login(url: str, name: str):
    """Log in through the hub's form, as a student's browser does, and ask for the server."""
    import requests

    s = requests.Session()
    page = s.get(f"{url}/hub/login", timeout=30)
    xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text)
    form = {"username": name, "password": "pw", **({"_xsrf": xsrf.group(1)} if xsrf else {})}
    r = s.post(f"{url}/hub/login", data=form, timeout=60, allow_redirects=False)
    assert r.status_code in (302, 303), f"login of {name} failed: {r.status_code} {r.text[:500]}"
    s.get(f"{url}/hub/spawn/{name}", timeout=120)  # starts the server (no options form)
    return s


def _wait_ready(url: str, token: str, name: str, timeout: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        user = requests.get(f"{url}/hub/api/users/{name}", headers={"Authorization": f"token {token}"},
                            timeout=30).json()
        server = (user.get("servers") or {}).get("")
        if server and server.get("ready"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name}'s server was not ready in {timeout:.0f} s: {user}")


class Kernel:
    """A kernel in a student's server, driven through the server's REST API and its websocket (Jupyter's protocol)."""

    def __init__(self, url: str, token: str, name: str, path: str):
        import requests
        import websocket

        self.headers = {"Authorization": f"token {token}"}
        base = f"{url}/user/{name}"
        r = requests.post(f"{base}/api/sessions", headers=self.headers, timeout=120,
                          json={"path": path, "type": "notebook", "kernel": {"name": "python3"}})
        assert r.status_code in (200, 201), f"{name}: no kernel: {r.status_code} {r.text[:500]}"
        kid = r.json()["kernel"]["id"]
        self.ws = websocket.create_connection(f"{base.replace('http', 'ws', 1)}/api/kernels/{kid}/channels",
                                              header=[f"Authorization: token {token}"], timeout=5)
        self.session = uuid.uuid4().hex

    def run(self, code: str) -> tuple[str, list[dict]]:
        """Execute ``code``; returns the reply's status and the outputs (iopub messages) it produced."""
        import websocket

        mid = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": mid, "username": "test", "session": self.session, "msg_type": "execute_request",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        outputs, status, idle_at = [], None, None
        deadline = time.monotonic() + 600
        while status is None or idle_at is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply in 600 s to: {code[:200]!r} (outputs so far: {outputs[-3:]})")
            if idle_at is not None and time.monotonic() - idle_at > 20:
                # the kernel went idle but its reply never came (a kernel-side loss: see labkit.runtime.stress);
                # the cell has finished and its errors are on IOPub
                status = "error" if any(o["type"] == "error" for o in outputs) else "ok"
                break
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if msg.get("parent_header", {}).get("msg_id") != mid:
                continue
            kind = msg["header"]["msg_type"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                status = msg["content"]["status"]
            elif kind == "status" and msg["content"].get("execution_state") == "idle":
                idle_at = time.monotonic()
            elif kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append({"type": kind, **msg["content"]})
        return status, outputs


def _text(outputs: list[dict]) -> str:
    parts = []
    for o in outputs:
        if o["type"] == "stream":
            parts.append(o["text"])
        elif o["type"] == "error":
            parts.append(f"{o['ename']}: {o['evalue']}")
        else:
            parts.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_two_students_on_one_hub_run_notebook_00_at_once(hub):
    import nbformat

    url, token, homes, remember = hub
    sessions = {name: _login(url, name) for name in STUDENTS}
    for name in STUDENTS:
        _wait_ready(url, token, name)
    remember()
    # each student reaches their own server with their login (the hub's OAuth), and not the other's
    for name, other in (STUDENTS, STUDENTS[::-1]):
        page = sessions[name].get(f"{url}/user/{name}/lab", timeout=120)   # the browser's way in: OAuth redirects
        assert page.status_code == 200 and page.url.startswith(f"{url}/user/{name}/lab"), (name, page.url)
        own = sessions[name].get(f"{url}/user/{name}/api/status", timeout=60)
        assert own.status_code == 200 and "kernels" in own.json(), (name, own.status_code, own.text[:300])
        theirs = sessions[name].get(f"{url}/user/{other}/lab", timeout=120)
        assert theirs.status_code == 403 or not theirs.url.startswith(f"{url}/user/{other}/"), \
            f"{name} reached {other}'s server: {theirs.status_code} {theirs.url}"
    rel = "00_start_here/00_start_here.ipynb"
    for name in STUDENTS:  # the hand-out reached each home on the first login: the student version
        copy = homes / name / rel
        assert copy.is_file(), f"no hand-out in {name}'s home: {sorted(p.name for p in (homes / name).glob('*'))}"
        assert "### BEGIN SOLUTION" not in copy.read_text() and "raise NotImplementedError()" in copy.read_text()
    cells = [c for c in nbformat.read(str(homes / STUDENTS[0] / rel), as_version=4).cells if c.cell_type == "code"]
    graded_cells = {i for i, c in enumerate(cells) if c.metadata.get("nbgrader", {}).get("grade")}
    assert graded_cells, "notebook 00 has no autograded check"
    results: dict[str, dict] = {}

    def student(name):
        k = Kernel(url, token, name, rel)
        try:
            status, out = k.run("import json, os, torch\nprint(json.dumps({'env': {v: os.environ.get(v) for v in "
                                "('CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS', 'LABKIT_SHARE', 'HOME')}, "
                                "'threads': torch.get_num_threads(), 'cwd': os.getcwd()}))")
            info = json.loads(_text(out).strip().splitlines()[-1])
            t0, failures, checks = time.time(), [], []
            for i, cell in enumerate(cells):
                status, out = k.run(cell.source)
                if status != "ok":
                    failures.append(f"cell {i}: {_text(out)[-1500:]}")
                    break
                if i in graded_cells:
                    checks.append(_text(out))
            results[name] = {"info": info, "start": t0, "end": time.time(), "failures": failures, "checks": checks}
        except Exception as e:  # reported by the main thread
            results[name] = {"error": repr(e)}
        finally:
            k.ws.close()

    threads = [threading.Thread(target=student, args=(n,)) for n in STUDENTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
        remember()
    assert not any(t.is_alive() for t in threads), "a student's notebook was still running after 15 minutes"
    for name in STUDENTS:
        r = results[name]
        assert "error" not in r, f"{name}: {r['error']}"
        assert not r["failures"], f"{name}'s notebook 00 failed: {r['failures']}"
        assert r["checks"] and all("not attempted yet" in c for c in r["checks"]), f"{name}: checks said {r['checks']}"
        assert r["info"]["env"]["HOME"] == str(homes / name) and r["info"]["cwd"] == str(homes / name / "00_start_here")
    # each server its own share, set by the spawner hook: round-robin GPUs (2 assumed, 2 students), cores // 2 threads
    a, b = (results[n]["info"] for n in STUDENTS)
    assert {a["env"]["CUDA_VISIBLE_DEVICES"], b["env"]["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}, (a["env"], b["env"])
    threads_each = str(max(1, classroom_cpus() // 2))
    assert a["env"]["OMP_NUM_THREADS"] == b["env"]["OMP_NUM_THREADS"] == threads_each
    assert a["threads"] == b["threads"] == int(threads_each)
    assert json.loads(a["env"]["LABKIT_SHARE"])["student"] == "alice"
    # at the same time: each notebook started before the other finished
    ra, rb = (results[n] for n in STUDENTS)
    assert ra["start"] < rb["end"] and rb["start"] < ra["end"], "the two notebooks did not overlap in time"


def classroom_cpus() -> int:
    from labkit.classroom import read_machine

    return read_machine(gpus=0).cpus
