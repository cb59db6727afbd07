from fedgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("version", "roster", "running_jobs", "cpu_count", "hostname", "memory_gb", "max_jobs")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    version: str
    roster: bytes
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    cpu_count: int
    hostname: str
    memory_gb: float
    max_jobs: int
    def __init__(self, version: _Optional[str] = ..., roster: _Optional[bytes] = ..., running_jobs: _Optional[_Iterable[str]] = ..., cpu_count: _Optional[int] = ..., hostname: _Optional[str] = ..., memory_gb: _Optional[float] = ..., max_jobs: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval", "server_name", "project")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval: float
    server_name: str
    project: str
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval: _Optional[float] = ..., server_name: _Optional[str] = ..., project: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "running_jobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., running_jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class CommandsRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("start_job", "abort_job")
    START_JOB_FIELD_NUMBER: _ClassVar[int]
    ABORT_JOB_FIELD_NUMBER: _ClassVar[int]
    start_job: StartJob
    abort_job: AbortJob
    def __init__(self, start_job: _Optional[_Union[StartJob, _Mapping]] = ..., abort_job: _Optional[_Union[AbortJob, _Mapping]] = ...) -> None: ...

class StartJob(_message.Message):
    __slots__ = ("job_id", "app", "workers_hint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    WORKERS_HINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    app: str
    workers_hint: int
    def __init__(self, job_id: _Optional[str] = ..., app: _Optional[str] = ..., workers_hint: _Optional[int] = ...) -> None: ...

class AbortJob(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FetchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobFrame(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: JobHeader
    data: bytes
    trailer: _common_pb2.Trailer
    def __init__(self, header: _Optional[_Union[JobHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_common_pb2.Trailer, _Mapping]] = ...) -> None: ...

class JobHeader(_message.Message):
    __slots__ = ("job_id", "app", "signed_manifest", "submitter_cert", "size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    SIGNED_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_CERT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    app: str
    signed_manifest: bytes
    submitter_cert: bytes
    size: int
    def __init__(self, job_id: _Optional[str] = ..., app: _Optional[str] = ..., signed_manifest: _Optional[bytes] = ..., submitter_cert: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class JobReport(_message.Message):
    __slots__ = ("job_id", "state", "error", "log")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: str
    error: str
    log: bytes
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., log: _Optional[bytes] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "next_task", "upload_slot", "result", "events", "ping", "received", "privacy")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    NEXT_TASK_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_SLOT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    next_task: TaskRequest
    upload_slot: UploadSlotRequest
    result: ResultFrame
    events: EventBatch
    ping: Ping
    received: TaskReceived
    privacy: PrivacyRequest
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., next_task: _Optional[_Union[TaskRequest, _Mapping]] = ..., upload_slot: _Optional[_Union[UploadSlotRequest, _Mapping]] = ..., result: _Optional[_Union[ResultFrame, _Mapping]] = ..., events: _Optional[_Union[EventBatch, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., received: _Optional[_Union[TaskReceived, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyRequest, _Mapping]] = ...) -> None: ...

class TaskReceived(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("task", "reply", "privacy")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    task: TaskFrame
    reply: Reply
    privacy: PrivacyReply
    def __init__(self, task: _Optional[_Union[TaskFrame, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyReply, _Mapping]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("message", "error", "idle_timeout")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    message: str
    error: str
    idle_timeout: float
    def __init__(self, message: _Optional[str] = ..., error: _Optional[str] = ..., idle_timeout: _Optional[float] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("job_id", "cached_sha256", "last_task_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAST_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    cached_sha256: bytes
    last_task_id: str
    def __init__(self, job_id: _Optional[str] = ..., cached_sha256: _Optional[bytes] = ..., last_task_id: _Optional[str] = ...) -> None: ...

class TaskFrame(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: TaskHeader
    data: bytes
    trailer: _common_pb2.Trailer
    def __init__(self, header: _Optional[_Union[TaskHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_common_pb2.Trailer, _Mapping]] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("job_id", "task_id", "kind", "round", "total_rounds", "payload_format", "payload_cached", "payload_sha256", "payload_size", "total_weight", "reason", "upload_slot", "evaluate_task_id", "evaluate_round", "acknowledge", "settings")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CACHED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_SLOT_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    kind: str
    round: int
    total_rounds: int
    payload_format: str
    payload_cached: bool
    payload_sha256: bytes
    payload_size: int
    total_weight: float
    reason: str
    upload_slot: bool
    evaluate_task_id: str
    evaluate_round: int
    acknowledge: bool
    settings: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., payload_format: _Optional[str] = ..., payload_cached: _Optional[bool] = ..., payload_sha256: _Optional[bytes] = ..., payload_size: _Optional[int] = ..., total_weight: _Optional[float] = ..., reason: _Optional[str] = ..., upload_slot: _Optional[bool] = ..., evaluate_task_id: _Optional[str] = ..., evaluate_round: _Optional[int] = ..., acknowledge: _Optional[bool] = ..., settings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UploadSlotRequest(_message.Message):
    __slots__ = ("job_id", "task_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class ResultFrame(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    data: bytes
    trailer: _common_pb2.Trailer
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_common_pb2.Trailer, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("job_id", "task_id", "payload_format", "num_samples", "metrics", "evaluation")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    payload_format: str
    num_samples: float
    metrics: _containers.ScalarMap[str, float]
    evaluation: Evaluation
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., payload_format: _Optional[str] = ..., num_samples: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("task_id", "num_samples", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    num_samples: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, task_id: _Optional[str] = ..., num_samples: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("job_id", "events")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, job_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "kind", "tag", "value", "step", "wall_time", "text", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    tag: str
    value: float
    step: int
    wall_time: float
    text: str
    params: _containers.ScalarMap[str, str]
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., tag: _Optional[str] = ..., value: _Optional[float] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., text: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PrivacyRequest(_message.Message):
    __slots__ = ("job_id", "job_key", "key_offer", "advertise", "shares", "unmask", "reveal")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_OFFER_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    REVEAL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job_key: JobKeyRequest
    key_offer: JobKeyOffer
    advertise: SecAggAdvert
    shares: SecAggShares
    unmask: SecAggUnmask
    reveal: SecAggReveal
    def __init__(self, job_id: _Optional[str] = ..., job_key: _Optional[_Union[JobKeyRequest, _Mapping]] = ..., key_offer: _Optional[_Union[JobKeyOffer, _Mapping]] = ..., advertise: _Optional[_Union[SecAggAdvert, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmask, _Mapping]] = ..., reveal: _Optional[_Union[SecAggReveal, _Mapping]] = ...) -> None: ...

class PrivacyReply(_message.Message):
    __slots__ = ("job_key", "keys", "inbox", "survivors", "done")
    JOB_KEY_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    job_key: JobKey
    keys: SecAggKeys
    inbox: SecAggInbox
    survivors: SecAggSurvivors
    done: str
    def __init__(self, job_key: _Optional[_Union[JobKey, _Mapping]] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., inbox: _Optional[_Union[SecAggInbox, _Mapping]] = ..., survivors: _Optional[_Union[SecAggSurvivors, _Mapping]] = ..., done: _Optional[str] = ...) -> None: ...

class JobKeyRequest(_message.Message):
    __slots__ = ("cert_pem",)
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    def __init__(self, cert_pem: _Optional[bytes] = ...) -> None: ...

class SiteCertificate(_message.Message):
    __slots__ = ("site", "cert_pem")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    site: str
    cert_pem: bytes
    def __init__(self, site: _Optional[str] = ..., cert_pem: _Optional[bytes] = ...) -> None: ...

class JobKey(_message.Message):
    __slots__ = ("key_site", "recipients", "wrapped")
    KEY_SITE_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    key_site: str
    recipients: _containers.RepeatedCompositeFieldContainer[SiteCertificate]
    wrapped: bytes
    def __init__(self, key_site: _Optional[str] = ..., recipients: _Optional[_Iterable[_Union[SiteCertificate, _Mapping]]] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class JobKeyOffer(_message.Message):
    __slots__ = ("public_context", "wrapped")
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    public_context: bytes
    wrapped: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, public_context: _Optional[bytes] = ..., wrapped: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SecAggAdvert(_message.Message):
    __slots__ = ("task_id", "site", "mask_key", "channel_key", "signature", "cert_pem")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    site: str
    mask_key: bytes
    channel_key: bytes
    signature: bytes
    cert_pem: bytes
    def __init__(self, task_id: _Optional[str] = ..., site: _Optional[str] = ..., mask_key: _Optional[bytes] = ..., channel_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., cert_pem: _Optional[bytes] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("sites", "adverts")
    SITES_FIELD_NUMBER: _ClassVar[int]
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedScalarFieldContainer[str]
    adverts: _containers.RepeatedCompositeFieldContainer[SecAggAdvert]
    def __init__(self, sites: _Optional[_Iterable[str]] = ..., adverts: _Optional[_Iterable[_Union[SecAggAdvert, _Mapping]]] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("task_id", "commitment", "shares")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    commitment: bytes
    shares: _containers.ScalarMap[str, bytes]
    def __init__(self, task_id: _Optional[str] = ..., commitment: _Optional[bytes] = ..., shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggInbox(_message.Message):
    __slots__ = ("shares",)
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.ScalarMap[str, bytes]
    def __init__(self, shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggUnmask(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class SecAggSurvivors(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("index", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SecAggReveal(_message.Message):
    __slots__ = ("task_id", "seed_shares", "key_shares")
    class SeedSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggShare, _Mapping]] = ...) -> None: ...
    class KeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecAggShare
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecAggShare, _Mapping]] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    seed_shares: _containers.MessageMap[str, SecAggShare]
    key_shares: _containers.MessageMap[str, SecAggShare]
    def __init__(self, task_id: _Optional[str] = ..., seed_shares: _Optional[_Mapping[str, SecAggShare]] = ..., key_shares: _Optional[_Mapping[str, SecAggShare]] = ...) -> None: ...
