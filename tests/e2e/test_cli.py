"""The `prunery` command line end to end on saved .pt2 files, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from prunery.core import load_program
from tests import zoo

REPORT_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "num_groups", "pruned_groups",
               "frozen_ops", "duration_s", "layers"}


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunery.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "resnet.pt2"
    torch.export.save(zoo.export("resnet_basic"), path)
    return path


def test_analyze_prints_groups_as_text_and_json(model: Path) -> None:
    text = run("analyze", str(model))
    assert text.returncode == 0, text.stderr
    data = json.loads(run("analyze", str(model), "--json").stdout)
    assert data["num_groups"] == len(data["groups"]) > 0
    assert text.stdout.splitlines()[0] == f"{data['num_groups']} groups"
    for g in data["groups"]:
        assert g["size"] > 0 and g["members"]
        assert all(set(m) == {"name", "dim"} for m in g["members"])
    names = {(m["name"], m["dim"]) for g in data["groups"] for m in g["members"]}
    assert ("fc.weight", 0) not in names  # the logits are the program's output
    assert ("fc.weight", 1) in names


def test_prune_writes_model_and_report(model: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "small.pt2", tmp_path / "report.json"
    proc = run("prune", str(model), "-o", str(out), "--ratio", "0.5", "--importance", "l1", "--global",
               "--round-to", "2", "--max-ratio", "0.8", "--ignore", "layer3.*", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    assert "params" in proc.stdout
    report = json.loads(report_path.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert len(layers) == len(dict(zoo.build("resnet_basic")[0].named_parameters()))
    for name, layer in layers.items():
        if name.startswith("layer3."):
            assert layer["shape_after"] == layer["shape_before"], name
    assert any(layer["shape_after"] != layer["shape_before"] for layer in layers.values())
    ep = load_program(out)
    y = ep.module()(*zoo.ZOO["resnet_basic"].example_inputs(5))
    assert y.shape == (5, 10)


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_prune_refuses_bad_files_with_one_line(content: bytes | None, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    if content is None:  # a zip that is not a .pt2
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("notes.txt", "hello")
    else:
        bad.write_bytes(content)
    out = tmp_path / "out.pt2"
    proc = run("prune", str(bad), "-o", str(out), "--ratio", "0.5")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunery: error:") and "refused" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_prune_refuses_bad_ratio_and_missing_file(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt2"
    proc = run("prune", str(model), "-o", str(out), "--ratio", "1.5")
    assert proc.returncode != 0 and "ratio must be in (0, 1)" in proc.stderr
    proc = run("prune", str(tmp_path / "missing.pt2"), "-o", str(out), "--ratio", "0.5")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A two-input program (token ids + attention mask) with a dynamic batch and sequence."""
    from tests.core.test_recovery_parts import Encoder

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    b, s = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", min=2, max=64)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt2"
    torch.export.save(torch.export.export(Encoder().eval(), (ids, mask), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s})),
                      path)
    return path


def test_prune_with_a_two_input_dataset_and_refusals_naming_the_tensor(encoder: Path, tmp_path: Path) -> None:
    from prunery.core.data import save_dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (128, 9), generator=g)
    mask = (torch.arange(9) < torch.randint(3, 10, (128, 1), generator=g)).long()
    good = save_dataset(tmp_path / "good.npz", {"input_ids": ids, "attention_mask": mask}, format="npz")
    out, report = tmp_path / "out.pt2", tmp_path / "r.json"
    proc = run("prune", str(encoder), "-o", str(out), "--ratio", "0.5", "--dataset", str(good), "--finetune-steps",
               "30", "--batch-size", "32", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["dataset"]["loss"] == "cosine" and data["evaluation"]["after"]["cosine"] > 0.5
    assert "latency ms, median of 7 interleaved rounds on 1 threads" in proc.stdout
    cases = {
        "missing": ({"input_ids": ids}, "no tensor for the program's input attention_mask"),
        "length": ({"input_ids": ids, "attention_mask": mask[:100]},
                   "attention_mask has 100 rows but input_ids has 128"),
        "float ids": ({"input_ids": ids.float(), "attention_mask": mask},
                      "input_ids is float32 but the program takes int64 token ids"),
        "out of range": ({"input_ids": ids + 1000, "attention_mask": mask}, "input_ids"),
    }
    for name, (tensors, message) in cases.items():
        path = save_dataset(tmp_path / f"{name}.npz", tensors, format="npz")
        for command in (("prune", str(encoder), "-o", str(out)),
                        ("submit", str(encoder), "--address", "127.0.0.1:9", "--token", "t")):
            proc = run(*command, "--ratio", "0.5", "--dataset", str(path), "--finetune-steps", "5")
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0 and len(lines) == 1, (name, command[0], proc.stderr)
            assert message in lines[0], (name, command[0], lines[0])  # refused before any upload or training


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    proc = run("demo", "--out", str(tmp_path / "demo"))  # the package's one model, resnet_basic
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert (tmp_path / "demo" / "resnet_basic-pruned.pt2").is_file()
    assert "output shape (4, 10)" in proc.stdout


# --- tokens and the client commands --------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    """This environment without PRUNERY_* settings (a developer's own would change the defaults tested)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
    env.update(extra)
    return env


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("prunery: error: "), proc.stderr
    return lines[0]


def _tables(url: str) -> set[str]:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_tokens_create_migrates_a_new_database_and_revoke_never_creates_one(tmp_path: Path) -> None:
    from prunery.service.store import db, testing

    with testing.temporary_postgres_database(prefix="prunery_cli") as url:
        line = _one_line_error(run("tokens", "revoke", "prn_nothing", "--database-url", url, env=_env()))
        assert "no Prunery schema" in line
        assert _tables(url) == set()  # revoke neither migrates nor creates anything
        proc = run("tokens", "create", "--tenant", "team-a", "--database-url", url, env=_env())
        assert proc.returncode == 0, proc.stderr
        token = proc.stdout.strip()
        assert token.startswith("prn_") and len(proc.stdout.splitlines()) == 1
        assert db.current_revision(url) is not None and {"tenants", "api_tokens", "jobs"} <= _tables(url)
        database = db.Database(url)
        try:
            with database.session() as s:
                assert db.authenticate(s, token) == "team-a"
        finally:
            database.dispose()
        proc = run("tokens", "revoke", token, "--database-url", url, env=_env())
        assert proc.returncode == 0 and proc.stdout.strip() == "revoked", proc.stderr
        assert "no such token" in _one_line_error(run("tokens", "revoke", token, "--database-url", url, env=_env()))
    sqlite = tmp_path / "new" / "prunery.db"  # a SQLite path that does not exist yet: created and migrated
    proc = run("tokens", "create", "--database-url", str(sqlite), env=_env())
    assert proc.returncode == 0 and proc.stdout.startswith("prn_"), proc.stderr
    assert db.current_revision(str(sqlite)) is not None
    assert run("tokens", "revoke", proc.stdout.strip(), "--database-url", f"sqlite:///{sqlite}",
               env=_env()).stdout.strip() == "revoked"


def test_token_commands_that_fail_leave_no_file_behind(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # no database named and none at the default ./prunery-data/prunery.db: refused, nothing created there
    for args in (("tokens", "create"), ("tokens", "revoke", "prn_x")):
        line = _one_line_error(run(*args, cwd=work, env=_env()))
        assert "--database-url" in line and "PRUNERY_DATABASE_URL" in line
    assert list(work.iterdir()) == []
    missing = work / "sub" / "x.db"
    assert "no database at" in _one_line_error(run("tokens", "revoke", "prn_x", "--database-url", str(missing),
                                                   env=_env()))
    line = _one_line_error(run("tokens", "create", "--tenant", "Not A Tenant", "--database-url", str(missing),
                               env=_env()))
    assert "invalid tenant id" in line
    # with migrations turned off (PRUNERY_MIGRATE=0, as for serve) a new database is refused, and removed again
    line = _one_line_error(run("tokens", "create", "--database-url", str(missing), env=_env(PRUNERY_MIGRATE="0")))
    assert "no Prunery schema" in line
    line = _one_line_error(run("tokens", "create", "--database-url",
                               "postgresql://postgres@127.0.0.1:5432/prunery_no_such_database", env=_env()))
    assert "prunery_no_such_database" in line and "does not exist" in line
    assert list(work.iterdir()) == []


@pytest.mark.slow
def test_client_commands_wait_out_an_api_restart(tmp_path: Path) -> None:
    from prunery.client import Client, spec_from_options
    from prunery.service.store import db, testing, tokens
    from tests.e2e.test_client import OUTAGE_S, ApiServer

    with testing.temporary_postgres_database(prefix="prunery_cli") as url:
        db.upgrade(url)
        token = tokens.create(url, "cli")
        api = ApiServer(url, tmp_path)
        api.start()
        try:
            model = tmp_path / "m.pt2"
            model.write_bytes(b"any bytes")
            with Client(api.address, token) as client:
                job = client.create_job(spec_from_options(client.upload(model).name, 0.5))
            env = _env(PRUNERY_ADDRESS=api.address, PRUNERY_TOKEN=token)
            api.kill()
            started = time.monotonic()
            line = _one_line_error(run("jobs", "get", job.name, env={**env, "PRUNERY_RETRY_BUDGET_S": "2"}))
            assert line.startswith("prunery: error: UNAVAILABLE: ") and time.monotonic() - started < 6
            restart = api.start_after(OUTAGE_S)
            started = time.monotonic()
            proc = run("jobs", "list", env=env)  # the default budget outlasts the restart
            restart.join()
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.split()[:2] == [job.name, "QUEUED"]
            assert time.monotonic() - started >= OUTAGE_S - 0.5
        finally:
            api.stop()
