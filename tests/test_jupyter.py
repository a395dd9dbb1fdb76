"""JupyterLab for real: a headless `jupyter lab` server runs lesson 01 through its REST and kernel APIs.

This is the path a learner takes after `jupyter lab notebooks/`: the server opens the notebook,
starts its kernel, and the cells run there (not in nbval's own kernel manager). The test starts
the server on a loopback port with a token, runs every code cell of lesson 01 over the kernel's
websocket, fails on any error output, and shuts the server down itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LESSON = "notebooks/01_from_rlhf_to_dpo.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        text = r.read().decode()
    return json.loads(text) if text else None


def _execute_request(code: str, session: str) -> dict:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "session": session,
                       "username": "test", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}


async def _run_cells(ws_url: str, token: str, cells: list[str], timeout: float) -> list[dict]:
    """Send each cell as an execute_request; collect its error outputs (iopub ``error`` messages)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}))
    session, errors = uuid.uuid4().hex, []
    for index, code in enumerate(cells):
        msg = _execute_request(code, session)
        await conn.write_message(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout=max(1.0, deadline - time.monotonic()))
            reply = json.loads(raw)
            if reply.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
                continue
            if reply["msg_type"] == "error":
                errors.append({"cell": index, "ename": reply["content"]["ename"]})
            if reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
                break
    conn.close()
    return errors


def test_jupyter_server_opens_and_runs_lesson_01_without_errors(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"), MPLBACKEND="agg")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}"]
    if os.geteuid() == 0:  # containers and CI machines often run as root
        cmd.append("--allow-root")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        for _ in range(300):
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.2)
        else:
            raise AssertionError("the Jupyter server did not start: " + server.stderr.read1().decode()[-2000:])
        model = _api(base, token, f"/api/contents/{LESSON}")
        assert model["type"] == "notebook"
        cells = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                 for c in model["content"]["cells"] if c["cell_type"] == "code"]
        assert len(cells) > 5
        session = _api(base, token, "/api/sessions", "POST",
                       {"path": LESSON, "type": "notebook", "kernel": {"name": "python3"}})
        ws = f"ws://127.0.0.1:{port}/api/kernels/{session['kernel']['id']}/channels"
        errors = asyncio.run(_run_cells(ws, token, cells, timeout=600))
        assert errors == []
        _api(base, token, f"/api/sessions/{session['id']}", "DELETE")
        _api(base, token, "/api/shutdown", "POST")
        server.wait(timeout=60)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
