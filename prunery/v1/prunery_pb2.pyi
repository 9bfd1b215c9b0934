import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    MODEL: _ClassVar[ArtifactKind]
    DATASET: _ClassVar[ArtifactKind]
    REPORT: _ClassVar[ArtifactKind]

class Importance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORTANCE_UNSPECIFIED: _ClassVar[Importance]
    L1: _ClassVar[Importance]
    L2: _ClassVar[Importance]
    BN: _ClassVar[Importance]
    RANDOM: _ClassVar[Importance]
    TAYLOR: _ClassVar[Importance]
    FISHER: _ClassVar[Importance]

class AttentionPruning(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_PRUNING_UNSPECIFIED: _ClassVar[AttentionPruning]
    ATTENTION_HEADS: _ClassVar[AttentionPruning]
    ATTENTION_HEAD_DIM: _ClassVar[AttentionPruning]
    ATTENTION_NONE: _ClassVar[AttentionPruning]

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_SGD: _ClassVar[Optimizer]
    OPTIMIZER_ADAM: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW: _ClassVar[Optimizer]

class DistillLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTILL_LOSS_UNSPECIFIED: _ClassVar[DistillLoss]
    DISTILL_LOSS_KL: _ClassVar[DistillLoss]
    DISTILL_LOSS_MSE: _ClassVar[DistillLoss]
    DISTILL_LOSS_COSINE: _ClassVar[DistillLoss]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLING: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
MODEL: ArtifactKind
DATASET: ArtifactKind
REPORT: ArtifactKind
IMPORTANCE_UNSPECIFIED: Importance
L1: Importance
L2: Importance
BN: Importance
RANDOM: Importance
TAYLOR: Importance
FISHER: Importance
ATTENTION_PRUNING_UNSPECIFIED: AttentionPruning
ATTENTION_HEADS: AttentionPruning
ATTENTION_HEAD_DIM: AttentionPruning
ATTENTION_NONE: AttentionPruning
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_SGD: Optimizer
OPTIMIZER_ADAM: Optimizer
OPTIMIZER_ADAMW: Optimizer
DISTILL_LOSS_UNSPECIFIED: DistillLoss
DISTILL_LOSS_KL: DistillLoss
DISTILL_LOSS_MSE: DistillLoss
DISTILL_LOSS_COSINE: DistillLoss
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLING: JobState
CANCELLED: JobState

class Artifact(_message.Message):
    __slots__ = ("name", "display_name", "kind", "size_bytes", "sha256", "create_time", "labels", "producer_job")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_JOB_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    kind: ArtifactKind
    size_bytes: int
    sha256: str
    create_time: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    producer_job: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., kind: _Optional[_Union[ArtifactKind, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., producer_job: _Optional[str] = ...) -> None: ...

class UploadArtifactRequest(_message.Message):
    __slots__ = ("metadata", "chunk", "sha256")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    metadata: Artifact
    chunk: bytes
    sha256: str
    def __init__(self, metadata: _Optional[_Union[Artifact, _Mapping]] = ..., chunk: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts", "next_page_token")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    next_page_token: str
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("name", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "artifact")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    artifact: Artifact
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneSpec(_message.Message):
    __slots__ = ("model", "ratio", "importance", "global_pruning", "round_to", "max_ratio", "ignore", "seed", "attention", "prune_hidden", "dataset", "held_out", "batch_size", "sparse_steps", "reg", "alpha", "lr", "finetune_steps", "finetune_lr", "distill", "target_macs", "target_params", "target_latency_ms", "target_steps", "finetune_epochs", "optimizer", "warmup", "clip_grad", "distill_loss", "teacher_weight", "hidden_weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_PRUNING_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    MAX_RATIO_FIELD_NUMBER: _ClassVar[int]
    IGNORE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    PRUNE_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_STEPS_FIELD_NUMBER: _ClassVar[int]
    REG_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_LR_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MACS_FIELD_NUMBER: _ClassVar[int]
    TARGET_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_FIELD_NUMBER: _ClassVar[int]
    DISTILL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    ratio: float
    importance: Importance
    global_pruning: bool
    round_to: int
    max_ratio: float
    ignore: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    attention: AttentionPruning
    prune_hidden: bool
    dataset: str
    held_out: float
    batch_size: int
    sparse_steps: int
    reg: float
    alpha: float
    lr: float
    finetune_steps: int
    finetune_lr: float
    distill: bool
    target_macs: float
    target_params: float
    target_latency_ms: float
    target_steps: int
    finetune_epochs: float
    optimizer: Optimizer
    warmup: float
    clip_grad: float
    distill_loss: DistillLoss
    teacher_weight: float
    hidden_weight: float
    def __init__(self, model: _Optional[str] = ..., ratio: _Optional[float] = ..., importance: _Optional[_Union[Importance, str]] = ..., global_pruning: _Optional[bool] = ..., round_to: _Optional[int] = ..., max_ratio: _Optional[float] = ..., ignore: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., attention: _Optional[_Union[AttentionPruning, str]] = ..., prune_hidden: _Optional[bool] = ..., dataset: _Optional[str] = ..., held_out: _Optional[float] = ..., batch_size: _Optional[int] = ..., sparse_steps: _Optional[int] = ..., reg: _Optional[float] = ..., alpha: _Optional[float] = ..., lr: _Optional[float] = ..., finetune_steps: _Optional[int] = ..., finetune_lr: _Optional[float] = ..., distill: _Optional[bool] = ..., target_macs: _Optional[float] = ..., target_params: _Optional[float] = ..., target_latency_ms: _Optional[float] = ..., target_steps: _Optional[int] = ..., finetune_epochs: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., warmup: _Optional[float] = ..., clip_grad: _Optional[float] = ..., distill_loss: _Optional[_Union[DistillLoss, str]] = ..., teacher_weight: _Optional[float] = ..., hidden_weight: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "spec", "state", "progress", "create_time", "start_time", "end_time", "attempt_count", "error", "result_artifacts", "report", "labels", "stage", "queue")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: PruneSpec
    state: JobState
    progress: float
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempt_count: int
    error: _status_pb2.Status
    result_artifacts: _containers.RepeatedScalarFieldContainer[str]
    report: _struct_pb2.Struct
    labels: _containers.ScalarMap[str, str]
    stage: str
    queue: str
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[PruneSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt_count: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., result_artifacts: _Optional[_Iterable[str]] = ..., report: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., stage: _Optional[str] = ..., queue: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job", "request_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    job: Job
    request_id: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "state", "progress", "stage", "message", "job")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state: JobState
    progress: float
    stage: str
    message: str
    job: Job
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
