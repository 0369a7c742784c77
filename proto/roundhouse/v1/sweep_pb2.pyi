import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from roundhouse.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SweepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWEEP_STATE_UNSPECIFIED: _ClassVar[SweepState]
    SWEEP_STATE_TUNING: _ClassVar[SweepState]
    SWEEP_STATE_TRAINING_TARGET: _ClassVar[SweepState]
    SWEEP_STATE_SUCCEEDED: _ClassVar[SweepState]
    SWEEP_STATE_FAILED: _ClassVar[SweepState]
    SWEEP_STATE_CANCELLED: _ClassVar[SweepState]
SWEEP_STATE_UNSPECIFIED: SweepState
SWEEP_STATE_TUNING: SweepState
SWEEP_STATE_TRAINING_TARGET: SweepState
SWEEP_STATE_SUCCEEDED: SweepState
SWEEP_STATE_FAILED: SweepState
SWEEP_STATE_CANCELLED: SweepState

class SweepSpec(_message.Message):
    __slots__ = ("name", "proxy", "target", "grid", "max_parallel", "objective")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROXY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    proxy: _job_pb2.JobSpec
    target: _job_pb2.JobSpec
    grid: SweepGrid
    max_parallel: int
    objective: SweepObjective
    def __init__(self, name: _Optional[str] = ..., proxy: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., target: _Optional[_Union[_job_pb2.JobSpec, _Mapping]] = ..., grid: _Optional[_Union[SweepGrid, _Mapping]] = ..., max_parallel: _Optional[int] = ..., objective: _Optional[_Union[SweepObjective, _Mapping]] = ...) -> None: ...

class SweepGrid(_message.Message):
    __slots__ = ("learning_rates", "weight_decays", "seeds", "hyperparameters")
    LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAYS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    learning_rates: _containers.RepeatedScalarFieldContainer[float]
    weight_decays: _containers.RepeatedScalarFieldContainer[float]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    hyperparameters: _containers.RepeatedCompositeFieldContainer[SweepHyperparameter]
    def __init__(self, learning_rates: _Optional[_Iterable[float]] = ..., weight_decays: _Optional[_Iterable[float]] = ..., seeds: _Optional[_Iterable[int]] = ..., hyperparameters: _Optional[_Iterable[_Union[SweepHyperparameter, _Mapping]]] = ...) -> None: ...

class SweepHyperparameter(_message.Message):
    __slots__ = ("field", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, field: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class SweepObjective(_message.Message):
    __slots__ = ("eval_windows",)
    EVAL_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    eval_windows: int
    def __init__(self, eval_windows: _Optional[int] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("job", "index", "learning_rate", "weight_decay", "seed", "hyperparameters", "state", "objective", "steps", "wall_seconds")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job: str
    index: int
    learning_rate: float
    weight_decay: float
    seed: int
    hyperparameters: _containers.ScalarMap[str, float]
    state: _job_pb2.JobState
    objective: float
    steps: int
    wall_seconds: float
    def __init__(self, job: _Optional[str] = ..., index: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., seed: _Optional[int] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., objective: _Optional[float] = ..., steps: _Optional[int] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class Sweep(_message.Message):
    __slots__ = ("name", "uid", "spec", "state", "state_reason", "state_message", "owner", "cancel_requested", "trials", "best_trial", "best_learning_rate", "best_weight_decay", "best_hyperparameters", "target_job", "target_state", "warnings", "create_time", "update_time", "end_time", "tuning_flops_ratio", "tuning_wall_seconds")
    class BestHyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_TRIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BEST_WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BEST_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_JOB_FIELD_NUMBER: _ClassVar[int]
    TARGET_STATE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    TUNING_FLOPS_RATIO_FIELD_NUMBER: _ClassVar[int]
    TUNING_WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    uid: str
    spec: SweepSpec
    state: SweepState
    state_reason: str
    state_message: str
    owner: str
    cancel_requested: bool
    trials: _containers.RepeatedCompositeFieldContainer[Trial]
    best_trial: str
    best_learning_rate: float
    best_weight_decay: float
    best_hyperparameters: _containers.ScalarMap[str, float]
    target_job: str
    target_state: _job_pb2.JobState
    warnings: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    tuning_flops_ratio: float
    tuning_wall_seconds: float
    def __init__(self, name: _Optional[str] = ..., uid: _Optional[str] = ..., spec: _Optional[_Union[SweepSpec, _Mapping]] = ..., state: _Optional[_Union[SweepState, str]] = ..., state_reason: _Optional[str] = ..., state_message: _Optional[str] = ..., owner: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., trials: _Optional[_Iterable[_Union[Trial, _Mapping]]] = ..., best_trial: _Optional[str] = ..., best_learning_rate: _Optional[float] = ..., best_weight_decay: _Optional[float] = ..., best_hyperparameters: _Optional[_Mapping[str, float]] = ..., target_job: _Optional[str] = ..., target_state: _Optional[_Union[_job_pb2.JobState, str]] = ..., warnings: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tuning_flops_ratio: _Optional[float] = ..., tuning_wall_seconds: _Optional[float] = ...) -> None: ...
