from roundhouse.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckpointEvent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_EVENT_UNSPECIFIED: _ClassVar[CheckpointEvent]
    CHECKPOINT_EVENT_COMMITTED: _ClassVar[CheckpointEvent]
    CHECKPOINT_EVENT_RESTORED: _ClassVar[CheckpointEvent]
    CHECKPOINT_EVENT_REJECTED: _ClassVar[CheckpointEvent]
    CHECKPOINT_EVENT_REMOVED: _ClassVar[CheckpointEvent]
CHECKPOINT_EVENT_UNSPECIFIED: CheckpointEvent
CHECKPOINT_EVENT_COMMITTED: CheckpointEvent
CHECKPOINT_EVENT_RESTORED: CheckpointEvent
CHECKPOINT_EVENT_REJECTED: CheckpointEvent
CHECKPOINT_EVENT_REMOVED: CheckpointEvent

class HeartbeatRequest(_message.Message):
    __slots__ = ("job", "attempt", "rank", "step", "phase")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    rank: int
    step: int
    phase: str
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("stop", "stop_reason")
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    stop_reason: str
    def __init__(self, stop: _Optional[bool] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("job", "attempt", "rank", "points")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    rank: int
    points: _containers.RepeatedCompositeFieldContainer[_job_pb2.MetricPoint]
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., points: _Optional[_Iterable[_Union[_job_pb2.MetricPoint, _Mapping]]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("stop", "stop_reason")
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    stop_reason: str
    def __init__(self, stop: _Optional[bool] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class ReportCheckpointRequest(_message.Message):
    __slots__ = ("job", "attempt", "rank", "event", "step", "layout", "path", "size_bytes", "message")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job: str
    attempt: int
    rank: int
    event: CheckpointEvent
    step: int
    layout: _job_pb2.Layout
    path: str
    size_bytes: int
    message: str
    def __init__(self, job: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., event: _Optional[_Union[CheckpointEvent, str]] = ..., step: _Optional[int] = ..., layout: _Optional[_Union[_job_pb2.Layout, _Mapping]] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ReportCheckpointResponse(_message.Message):
    __slots__ = ("stop", "stop_reason")
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    stop: bool
    stop_reason: str
    def __init__(self, stop: _Optional[bool] = ..., stop_reason: _Optional[str] = ...) -> None: ...
