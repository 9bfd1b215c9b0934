"""The production shape end to end through gRPC: the API server on a loopback port, Postgres, Redis as
the broker, an S3-compatible store (moto's server) and a real worker process (`python -m prunery.worker`),
driven by the Python client as a pipeline would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from prunery.client import Client, PruneryError, spec_from_options
from prunery.core import count, load_program
from prunery.service.api.server import build_server
from prunery.service.api.settings import Settings
from prunery.service.store import db, tokens
from prunery.service.store.testing import MOTO_CREDENTIALS, moto_server, temporary_postgres_database
from prunery.v1 import prunery_pb2 as pb
from tests import zoo
from tests.worker.test_worker import _with_evil_sample_inputs

REDIS_URL = os.environ.get("PRUNERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[Client]:
    data = tmp_path_factory.mktemp("svc")
    with temporary_postgres_database(prefix="prunery_e2e") as url, moto_server() as endpoint:
        os.environ.update(MOTO_CREDENTIALS)
        bucket = f"prunery-e2e-{uuid.uuid4().hex[:8]}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        settings = Settings(data_dir=data, database_url=url, store_url=f"s3://{bucket}/x?endpoint_url={endpoint}",
                            broker_url=REDIS_URL, queue=f"q-{uuid.uuid4().hex[:8]}",
                            broker_keyprefix=f"prunery-e2e-{uuid.uuid4().hex[:8]}:", listen_address="127.0.0.1:0")
        db.upgrade(url)
        token = tokens.create(url, "team-a")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRUNERY_")}
        env.update(MOTO_CREDENTIALS)
        env.update(PRUNERY_DATA_DIR=str(data), PRUNERY_DATABASE_URL=url, PRUNERY_STORE_URL=settings.store_url,
                   PRUNERY_BROKER_URL=REDIS_URL, PRUNERY_QUEUE=settings.queue,
                   PRUNERY_BROKER_KEYPREFIX=settings.broker_keyprefix, PRUNERY_TEST_HOOKS="1",
                   PRUNERY_HEARTBEAT_S="0.5", PRUNERY_CANCEL_GRACE_S="3")
        log = open(data / "worker.log", "wb")  # noqa: SIM115 - closed below
        worker = subprocess.Popen([sys.executable, "-m", "prunery.worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        server = build_server(settings)
        server.start()
        try:
            with Client(f"127.0.0.1:{server.port}", token) as c:
                yield c
        finally:
            server.stop(2)
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
            log.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "resnet.pt2"
    torch.export.save(zoo.export("resnet_basic"), path)
    return path


def test_upload_create_watch_download(client: Client, model_path: Path, tmp_path: Path) -> None:
    artifact = client.upload(model_path, labels={"team": "vision"})
    assert artifact.size_bytes == model_path.stat().st_size
    job = client.create_job(spec_from_options(artifact.name, 0.5, "l1"), labels={"team": "vision"},
                            request_id="e2e-1")
    retry = client.create_job(spec_from_options(artifact.name, 0.5, "l1"), labels={"team": "vision"},
                              request_id="e2e-1")
    assert retry.name == job.name
    states = [e.state for e in client.watch_job(job.name)]
    assert states[-1] == pb.SUCCEEDED and pb.RUNNING in states
    done = client.get_job(job.name)
    assert done.attempt_count == 1 and len(done.result_artifacts) == 2
    out = client.download(f"{job.name}/model", tmp_path / "small.pt2")
    small = load_program(out)
    assert count(small).params < count(load_program(model_path)).params
    assert small.module()(*zoo.ZOO["resnet_basic"].example_inputs(3)).shape == (3, 10)
    assert done.report["params_after"] == count(small).params
    assert [j.name for j in client.list_jobs(filter="labels.team=vision")] == [job.name]


def test_a_transformer_job_gives_the_model_a_local_run_of_the_same_spec_gives(client: Client, tmp_path: Path) -> None:
    from prunery.core import PruneConfig, prune
    from tests import zoo_seq

    ep = zoo_seq.export("llama")
    path = tmp_path / "llama.pt2"
    torch.export.save(ep, path)
    spec = spec_from_options(client.upload(path).name, 0.5, attention="head-dim", prune_hidden=True)
    job = client.wait(client.create_job(spec).name)
    assert job.state == pb.SUCCEEDED, job.error.message
    assert job.spec.attention == pb.ATTENTION_HEAD_DIM and job.spec.prune_hidden
    served = load_program(client.download(f"{job.name}/model", tmp_path / "served.pt2"))
    local = prune(load_program(path), PruneConfig(ratio=0.5, attention="head-dim", prune_hidden=True)).program
    assert {k: v.shape for k, v in served.state_dict.items()} == {k: v.shape for k, v in local.state_dict.items()}
    assert served.state_dict["layers.0.attn.q_proj.weight"].shape[0] < 64  # head dims went
    assert served.state_dict["embed.weight"].shape[1] < 64  # and the hidden size
    x = zoo_seq.SEQ_ZOO["llama"].make_inputs(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(served.module()(*x), local.module()(*x))


def _blobs_model(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A small classifier trained on ten Gaussian blobs, exported; its dataset, and a copy with a NaN."""
    from torch import nn

    from prunery.core.data import save_dataset

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g) * 2
    y = torch.randint(0, 10, (400,), generator=g)
    x = centers[y] + torch.randn(400, 32, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(200):
        i = torch.randint(0, 400, (64,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ep = torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    torch.export.save(ep, tmp_path / "blobs.pt2")
    save_dataset(tmp_path / "blobs.safetensors", x, y)
    bad = x.clone()
    bad[7, 3] = float("inf")
    save_dataset(tmp_path / "bad.npz", bad, y, format="npz")
    return tmp_path / "blobs.pt2", tmp_path / "blobs.safetensors", tmp_path / "bad.npz"


def test_a_data_driven_job_sparse_trains_meets_its_target_and_recovers(client: Client, tmp_path: Path) -> None:
    model, data, bad = _blobs_model(tmp_path)
    model_name = client.upload(model).name
    dataset = client.upload(data, kind=pb.DATASET).name
    spec = spec_from_options(model_name, 0.0, "taylor", dataset=dataset, sparse_steps=30, reg=1e-3,
                             finetune_steps=30, target_macs=0.3)
    job = client.create_job(spec)
    events = list(client.watch_job(job.name))
    assert events[-1].state == pb.SUCCEEDED, client.get_job(job.name).error.message
    stages = [e.stage for e in events]
    for stage in ("load", "sparse", "prune", "finetune", "evaluate", "export", "store"):
        assert stage in stages, stages
    assert stages.count("sparse") >= 5 and stages.count("finetune") >= 5  # progress events per step
    assert [e.progress for e in events] == sorted(e.progress for e in events)
    done = client.get_job(job.name)
    report = done.report
    assert report["target"]["met"] and abs(report["target"]["within"]) <= 0.02
    assert report["evaluation"]["before"]["accuracy"] > 0.9 and "after" in report["evaluation"]
    assert len(report["training"]["sparse"]["loss_curve"]) > 5 and report["training"]["finetune"]["curve"]
    small = load_program(client.download(f"{job.name}/model", tmp_path / "small.pt2"))
    assert count(small).macs == report["macs_after"]
    # a dataset the engine refuses fails its job with the reason, and the worker goes on
    failed = client.wait(client.create_job(spec_from_options(model_name, 0.5, dataset=client.upload(
        bad, kind=pb.DATASET).name, finetune_steps=5)).name)
    assert failed.state == pb.FAILED and "inf" in failed.error.message
    assert failed.error.details and b"DATASET_INVALID" in failed.error.details[0].value


def _local_and_served_runs_agree(client: Client, tmp_path: Path, ep: torch.export.ExportedProgram,
                                 data: dict[str, torch.Tensor], ratio: float, **recipe) -> dict:
    """Upload `ep` and `data`, run the job, run the same spec locally; the weights must be equal."""
    from prunery.core import PruneConfig
    from prunery.core.data import Dataset, save_dataset
    from prunery.core.recipe import Recipe, run_recipe

    torch.export.save(ep, tmp_path / "model.pt2")
    targets = data.pop("targets", None)
    save_dataset(tmp_path / "data.safetensors", data, targets)
    spec = spec_from_options(client.upload(tmp_path / "model.pt2").name, ratio,
                             dataset=client.upload(tmp_path / "data.safetensors", kind=pb.DATASET).name, **recipe)
    job = client.wait(client.create_job(spec).name)
    assert job.state == pb.SUCCEEDED, job.error.message
    served = load_program(client.download(f"{job.name}/model", tmp_path / "served.pt2"))
    local = run_recipe(load_program(tmp_path / "model.pt2"), PruneConfig(ratio=ratio),
                       Recipe(dataset=Dataset(data, targets), device="cpu", **recipe))
    assert served.state_dict.keys() == local.program.state_dict.keys()
    for name, value in local.program.state_dict.items():
        assert torch.equal(served.state_dict[name], value), name
    return dict(job.report)


def test_a_recovery_job_gives_the_model_a_local_run_of_the_same_spec_gives(client: Client, tmp_path: Path) -> None:
    """Batch norm trained, recalibrated, KD beside the labels (a CNN); cosine distillation of a two-input
    encoder: the service runs exactly what `prunery prune` runs."""
    from torch import nn

    from tests.core.test_recovery_parts import Encoder

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(160, 3, 8, 8)
    ep = torch.export.export(cnn.eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    report = _local_and_served_runs_agree(client, tmp_path, ep, {"inputs": x, "targets": torch.randint(0, 4, (160,))},
                                          0.5, sparse_steps=10, reg=1e-3, finetune_steps=12, batch_size=32)
    assert report["dataset"]["loss"] == "ce+kl" and "after_recalibration" in report["evaluation"]

    ids = torch.randint(0, 50, (160, 9))
    mask = (torch.arange(9) < torch.randint(3, 10, (160, 1))).long()
    b, s = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", min=2, max=64)
    enc = torch.export.export(Encoder().eval(), (ids[:2], mask[:2]), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
    report = _local_and_served_runs_agree(client, tmp_path, enc, {"input_ids": ids, "attention_mask": mask}, 0.5,
                                          finetune_steps=12, distill=True, batch_size=32)
    assert report["dataset"]["loss"] == "cosine"


def test_malicious_upload_fails_its_job_and_never_runs(client: Client, model_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    evil.write_bytes(_with_evil_sample_inputs(model_path.read_bytes(), marker))
    job = client.create_job(spec_from_options(client.upload(evil).name, 0.5))
    done = client.wait(job.name)
    assert done.state == pb.FAILED
    assert "refused" in done.error.message and "sample_inputs" in done.error.message
    assert not marker.exists()
    with pytest.raises(PruneryError, match="FAILED_PRECONDITION"):
        client.download(f"{job.name}/model", tmp_path / "nothing.pt2")
    assert not (tmp_path / "nothing.pt2").exists()


def test_cancel_a_running_job(client: Client, model_path: Path) -> None:
    artifact = client.upload(model_path)
    job = client.create_job(spec_from_options(artifact.name, 0.5), labels={"prunery-test-delay": "prune=60"})
    deadline = time.monotonic() + 60
    while client.get_job(job.name).state != pb.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    t0 = time.monotonic()
    client.cancel_job(job.name)
    done = client.wait(job.name)
    assert done.state == pb.CANCELLED
    assert time.monotonic() - t0 < 10
