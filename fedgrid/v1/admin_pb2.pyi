from fedgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("roster",)
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    roster: bytes
    def __init__(self, roster: _Optional[bytes] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("name", "org", "role", "project", "server_name", "server_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    org: str
    role: str
    project: str
    server_name: str
    server_version: str
    def __init__(self, name: _Optional[str] = ..., org: _Optional[str] = ..., role: _Optional[str] = ..., project: _Optional[str] = ..., server_name: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("target", "names")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    target: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, target: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("server", "sites")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    server: ServerStatus
    sites: _containers.RepeatedCompositeFieldContainer[SiteStatus]
    def __init__(self, server: _Optional[_Union[ServerStatus, _Mapping]] = ..., sites: _Optional[_Iterable[_Union[SiteStatus, _Mapping]]] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("name", "project", "started", "uptime", "sites_alive", "sites_known", "jobs_running", "jobs_queued", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    SITES_ALIVE_FIELD_NUMBER: _ClassVar[int]
    SITES_KNOWN_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    JOBS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    project: str
    started: float
    uptime: float
    sites_alive: int
    sites_known: int
    jobs_running: int
    jobs_queued: int
    version: str
    def __init__(self, name: _Optional[str] = ..., project: _Optional[str] = ..., started: _Optional[float] = ..., uptime: _Optional[float] = ..., sites_alive: _Optional[int] = ..., sites_known: _Optional[int] = ..., jobs_running: _Optional[int] = ..., jobs_queued: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("name", "org", "state", "last_heartbeat", "address", "registered", "running_jobs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    name: str
    org: str
    state: str
    last_heartbeat: float
    address: str
    registered: float
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., org: _Optional[str] = ..., state: _Optional[str] = ..., last_heartbeat: _Optional[float] = ..., address: _Optional[str] = ..., registered: _Optional[float] = ..., running_jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadFrame(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    trailer: _common_pb2.Trailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_common_pb2.Trailer, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("signed_manifest", "size")
    SIGNED_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    signed_manifest: bytes
    size: int
    def __init__(self, signed_manifest: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("job_id", "name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("all", "name_prefix", "max")
    ALL_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    all: bool
    name_prefix: str
    max: int
    def __init__(self, all: _Optional[bool] = ..., name_prefix: _Optional[str] = ..., max: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "status", "submitter", "submitter_org", "submit_time", "start_time", "end_time", "current_round", "num_rounds", "error", "sites", "encrypted", "cloned_from")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_FIELD_NUMBER: _ClassVar[int]
    SUBMITTER_ORG_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    CLONED_FROM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    status: str
    submitter: str
    submitter_org: str
    submit_time: float
    start_time: float
    end_time: float
    current_round: int
    num_rounds: int
    error: str
    sites: _containers.RepeatedScalarFieldContainer[str]
    encrypted: bool
    cloned_from: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., submitter: _Optional[str] = ..., submitter_org: _Optional[str] = ..., submit_time: _Optional[float] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., current_round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., error: _Optional[str] = ..., sites: _Optional[_Iterable[str]] = ..., encrypted: _Optional[bool] = ..., cloned_from: _Optional[str] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "sites_answered", "sites_asked", "seconds", "metrics", "bytes_moved")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITES_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    SITES_ASKED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    round: int
    sites_answered: int
    sites_asked: int
    seconds: float
    metrics: _containers.ScalarMap[str, float]
    bytes_moved: int
    def __init__(self, round: _Optional[int] = ..., sites_answered: _Optional[int] = ..., sites_asked: _Optional[int] = ..., seconds: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., bytes_moved: _Optional[int] = ...) -> None: ...

class JobDetail(_message.Message):
    __slots__ = ("info", "meta_json", "rounds", "site_states", "result_json")
    class SiteStatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SITE_STATES_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    info: JobInfo
    meta_json: str
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    site_states: _containers.ScalarMap[str, str]
    result_json: str
    def __init__(self, info: _Optional[_Union[JobInfo, _Mapping]] = ..., meta_json: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., site_states: _Optional[_Mapping[str, str]] = ..., result_json: _Optional[str] = ...) -> None: ...

class DownloadFrame(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: DownloadHeader
    data: bytes
    trailer: _common_pb2.Trailer
    def __init__(self, header: _Optional[_Union[DownloadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[_common_pb2.Trailer, _Mapping]] = ...) -> None: ...

class DownloadHeader(_message.Message):
    __slots__ = ("job_id", "size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    size: int
    def __init__(self, job_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class JobLogRequest(_message.Message):
    __slots__ = ("job_id", "source", "lines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    source: str
    lines: int
    def __init__(self, job_id: _Optional[str] = ..., source: _Optional[str] = ..., lines: _Optional[int] = ...) -> None: ...

class JobLogReply(_message.Message):
    __slots__ = ("text", "path")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    text: str
    path: str
    def __init__(self, text: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_round")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_round: int
    def __init__(self, job_id: _Optional[str] = ..., from_round: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("round", "finished", "status")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    finished: JobInfo
    status: JobInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ..., finished: _Optional[_Union[JobInfo, _Mapping]] = ..., status: _Optional[_Union[JobInfo, _Mapping]] = ...) -> None: ...
