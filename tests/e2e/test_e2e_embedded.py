"""`prunery up` (the embedded stack) and the client commands end to end, as the README runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunery.core import count, load_program
from prunery.service.store.testing import free_port
from tests import zoo


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunery.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "prunery.cli", "up", "--data-dir", str(data), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    found: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while len(found) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        key, _, value = line.strip().partition(": ")
        if key in ("address", "token"):
            found[key] = value
    if len(found) < 2:
        proc.kill()
        raise AssertionError(f"prunery up did not print address and token: {proc.stderr.read()[-2000:]}")
    env = {**os.environ, "PRUNERY_ADDRESS": found["address"], "PRUNERY_TOKEN": found["token"]}
    yield env, data
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_submit_wait_download_through_the_embedded_stack(stack, tmp_path: Path) -> None:
    env, _ = stack
    model = tmp_path / "model.pt2"
    torch.export.save(zoo.export("resnet_basic"), model)
    out, report = tmp_path / "small.pt2", tmp_path / "report.json"
    proc = _cli("submit", str(model), "--ratio", "0.5", "--wait", "-o", str(out), "--report", str(report), env=env)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.splitlines()[0]
    assert job.startswith("jobs/")
    small = load_program(out)
    assert count(small).params < count(load_program(model)).params
    assert small.module()(*zoo.ZOO["resnet_basic"].example_inputs(3)).shape == (3, 10)
    data = json.loads(report.read_text())
    assert data["params_after"] == count(small).params

    # the same spec run locally gives the same model
    local = tmp_path / "local.pt2"
    assert _cli("prune", str(model), "-o", str(local), "--ratio", "0.5", env=env).returncode == 0
    for name, t in load_program(local).state_dict.items():
        torch.testing.assert_close(small.state_dict[name], t)

    listed = _cli("jobs", "list", env=env)
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout
    got = _cli("jobs", "get", job, "--json", env=env)
    assert json.loads(got.stdout)["state"] == "SUCCEEDED"
    again = tmp_path / "again.pt2"
    assert _cli("download", job, "-o", str(again), env=env).returncode == 0
    assert again.read_bytes() == out.read_bytes()


def test_bad_token_and_malicious_upload(stack, tmp_path: Path) -> None:
    env, _ = stack
    model = tmp_path / "model.pt2"
    torch.export.save(zoo.export("conv1d"), model)
    bad = _cli("jobs", "list", env={**env, "PRUNERY_TOKEN": "nope"})
    assert bad.returncode != 0 and "UNAUTHENTICATED" in bad.stderr
    not_a_model = tmp_path / "junk.pt2"
    not_a_model.write_bytes(b"definitely not a zip")
    proc = _cli("submit", str(not_a_model), "--ratio", "0.5", "--wait", env=env)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and "refused" in proc.stdout
    # the worker goes on with the next job
    proc = _cli("submit", str(model), "--ratio", "0.3", "--wait", env=env)
    assert proc.returncode == 0, proc.stderr
