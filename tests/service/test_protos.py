"""The gRPC contract: committed generated code matches the protos, imports cleanly, and keeps its wire numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "protos" / "generate.py"

# Field numbers are the wire contract: once landed, never renumber or reuse (add new fields instead).
FIELD_NUMBERS = {
    "Artifact": {"name": 1, "display_name": 2, "kind": 3, "size_bytes": 4, "sha256": 5, "create_time": 6,
                 "labels": 7, "producer_job": 8},
    "ArtifactChunk": {"offset": 1, "data": 2, "artifact": 3},
    "CancelJobRequest": {"name": 1},
    "CreateJobRequest": {"job": 1, "request_id": 2},
    "DeleteArtifactRequest": {"name": 1},
    "DeleteArtifactResponse": {},
    "DeleteJobRequest": {"name": 1},
    "DeleteJobResponse": {},
    "DownloadArtifactRequest": {"name": 1, "offset": 2},
    "GetArtifactRequest": {"name": 1},
    "GetJobRequest": {"name": 1},
    "Job": {"name": 1, "spec": 2, "state": 3, "progress": 4, "create_time": 5, "start_time": 6, "end_time": 7,
            "attempt_count": 8, "error": 9, "result_artifacts": 10, "report": 11, "labels": 12, "stage": 13,
            "queue": 14},
    "JobEvent": {"sequence": 1, "time": 2, "state": 3, "progress": 4, "stage": 5, "message": 6, "job": 7},
    "ListArtifactsRequest": {"page_size": 1, "page_token": 2, "filter": 3},
    "ListArtifactsResponse": {"artifacts": 1, "next_page_token": 2},
    "ListJobsRequest": {"page_size": 1, "page_token": 2, "filter": 3},
    "ListJobsResponse": {"jobs": 1, "next_page_token": 2},
    "PruneSpec": {"model": 1, "ratio": 2, "importance": 3, "global_pruning": 4, "round_to": 5, "max_ratio": 6,
                  "ignore": 7, "seed": 8, "attention": 9, "prune_hidden": 10, "dataset": 11, "held_out": 12,
                  "batch_size": 13, "sparse_steps": 14, "reg": 15, "alpha": 16, "lr": 17, "finetune_steps": 18,
                  "finetune_lr": 19, "distill": 20, "target_macs": 21, "target_params": 22, "target_latency_ms": 23,
                  "target_steps": 24, "finetune_epochs": 25, "optimizer": 26, "warmup": 27, "clip_grad": 28,
                  "distill_loss": 29, "teacher_weight": 30, "hidden_weight": 31},
    "UploadArtifactRequest": {"metadata": 1, "chunk": 2, "sha256": 3},
    "WatchJobRequest": {"name": 1, "after_sequence": 2},
}
ENUMS = {
    "ArtifactKind": {"ARTIFACT_KIND_UNSPECIFIED": 0, "MODEL": 1, "DATASET": 2, "REPORT": 3},
    "Importance": {"IMPORTANCE_UNSPECIFIED": 0, "L1": 1, "L2": 2, "BN": 3, "RANDOM": 4, "TAYLOR": 5, "FISHER": 6},
    "AttentionPruning": {"ATTENTION_PRUNING_UNSPECIFIED": 0, "ATTENTION_HEADS": 1, "ATTENTION_HEAD_DIM": 2,
                         "ATTENTION_NONE": 3},
    "Optimizer": {"OPTIMIZER_UNSPECIFIED": 0, "OPTIMIZER_SGD": 1, "OPTIMIZER_ADAM": 2, "OPTIMIZER_ADAMW": 3},
    "DistillLoss": {"DISTILL_LOSS_UNSPECIFIED": 0, "DISTILL_LOSS_KL": 1, "DISTILL_LOSS_MSE": 2,
                    "DISTILL_LOSS_COSINE": 3},
    "JobState": {"JOB_STATE_UNSPECIFIED": 0, "QUEUED": 1, "RUNNING": 2, "SUCCEEDED": 3, "FAILED": 4,
                 "CANCELLING": 5, "CANCELLED": 6},
}


def run_generate(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_committed_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    result = run_generate(GENERATE, "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_diff_summary_when_the_committed_code_is_stale(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "prunery" / "v1", tmp_path / "prunery" / "v1", ignore=shutil.ignore_patterns("__pycache__"))
    stale = tmp_path / "prunery" / "v1" / "prunery_pb2.pyi"
    stale.write_text(stale.read_text() + "\nhand_edited: int\n")
    (tmp_path / "prunery" / "v1" / "prunery_pb2_old.py").write_text("# left behind\n")
    script = tmp_path / "protos" / "generate.py"
    result = run_generate(script, "--check")
    assert result.returncode == 1
    assert "prunery/v1/prunery_pb2.pyi: differs" in result.stderr and "hand_edited" in result.stderr
    assert "prunery_pb2_old.py: committed but no longer generated" in result.stderr
    # regenerating repairs it
    assert run_generate(script).returncode == 0
    assert run_generate(script, "--check").returncode == 0
    assert not (tmp_path / "prunery" / "v1" / "prunery_pb2_old.py").exists()


def test_generated_modules_import_and_pass_their_runtime_version_checks() -> None:
    # A fresh interpreter: the version checks run at import, and nothing of torch may come along.
    code = ("import sys; from prunery.v1 import prunery_pb2, prunery_pb2_grpc; "
            "from grpc_health.v1 import health_pb2_grpc; from grpc_reflection.v1alpha import reflection; "
            "from grpc_status import rpc_status; from google.rpc import error_details_pb2; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(prunery_pb2.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "prunery.v1.prunery_pb2"


def test_wire_numbers_and_services_are_stable() -> None:
    from prunery.v1 import prunery_pb2 as pb

    fields = {name: {f.name: f.number for f in m.fields} for name, m in pb.DESCRIPTOR.message_types_by_name.items()}
    assert fields == FIELD_NUMBERS
    enums = {name: {v.name: v.number for v in e.values} for name, e in pb.DESCRIPTOR.enum_types_by_name.items()}
    assert enums == ENUMS
    services = {name: [m.name for m in s.methods] for name, s in pb.DESCRIPTOR.services_by_name.items()}
    assert services == {
        "ArtifactService": ["UploadArtifact", "GetArtifact", "ListArtifacts", "DeleteArtifact", "DownloadArtifact"],
        "JobService": ["CreateJob", "GetJob", "ListJobs", "CancelJob", "DeleteJob", "WatchJob"],
    }
    methods = pb.DESCRIPTOR.services_by_name["ArtifactService"].methods_by_name
    assert methods["UploadArtifact"].client_streaming and not methods["UploadArtifact"].server_streaming
    assert methods["DownloadArtifact"].server_streaming
    assert pb.DESCRIPTOR.services_by_name["JobService"].methods_by_name["WatchJob"].server_streaming


def test_messages_round_trip_with_google_rpc_status_and_struct() -> None:
    from google.protobuf import struct_pb2
    from google.rpc import code_pb2, status_pb2

    from prunery.v1 import prunery_pb2 as pb
    from prunery.v1 import prunery_pb2_grpc as pb_grpc

    report = struct_pb2.Struct()
    report.update({"params_before": 100, "params_after": 40})
    job = pb.Job(name="jobs/1", state=pb.FAILED, labels={"team": "vision"}, report=report,
                 spec=pb.PruneSpec(model="artifacts/2", ratio=0.5, importance=pb.L1, ignore=["fc.*"]),
                 error=status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad"))
    back = pb.Job.FromString(job.SerializeToString())
    assert back == job and back.error.code == code_pb2.INVALID_ARGUMENT and back.report["params_after"] == 40
    assert pb.JobState.Name(back.state) == "FAILED"
    assert hasattr(pb_grpc, "JobServiceStub") and hasattr(pb_grpc, "add_ArtifactServiceServicer_to_server")
