import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_LAUNCHING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_RESTARTING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class AttemptState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_STATE_UNSPECIFIED: _ClassVar[AttemptState]
    ATTEMPT_STATE_PENDING: _ClassVar[AttemptState]
    ATTEMPT_STATE_RUNNING: _ClassVar[AttemptState]
    ATTEMPT_STATE_SUCCEEDED: _ClassVar[AttemptState]
    ATTEMPT_STATE_FAILED: _ClassVar[AttemptState]
    ATTEMPT_STATE_CANCELLED: _ClassVar[AttemptState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_LAUNCHING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_RESTARTING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
ATTEMPT_STATE_UNSPECIFIED: AttemptState
ATTEMPT_STATE_PENDING: AttemptState
ATTEMPT_STATE_RUNNING: AttemptState
ATTEMPT_STATE_SUCCEEDED: AttemptState
ATTEMPT_STATE_FAILED: AttemptState
ATTEMPT_STATE_CANCELLED: AttemptState

class JobSpec(_message.Message):
    __slots__ = ("name", "labels", "model", "parallelism", "training", "data", "resources", "restart_policy", "checkpoint", "env", "kubernetes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    RESTART_POLICY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    model: ModelSpec
    parallelism: ParallelismSpec
    training: TrainingSpec
    data: DataSpec
    resources: ResourcesSpec
    restart_policy: RestartPolicy
    checkpoint: CheckpointSpec
    env: _containers.ScalarMap[str, str]
    kubernetes: KubernetesSpec
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., parallelism: _Optional[_Union[ParallelismSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., resources: _Optional[_Union[ResourcesSpec, _Mapping]] = ..., restart_policy: _Optional[_Union[RestartPolicy, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSpec, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., kubernetes: _Optional[_Union[KubernetesSpec, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("layers", "hidden_size", "heads", "seq_length", "vocab_size", "norm", "mlp", "positions", "mup")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    MLP_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MUP_FIELD_NUMBER: _ClassVar[int]
    layers: int
    hidden_size: int
    heads: int
    seq_length: int
    vocab_size: int
    norm: str
    mlp: str
    positions: str
    mup: MupSpec
    def __init__(self, layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., heads: _Optional[int] = ..., seq_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., norm: _Optional[str] = ..., mlp: _Optional[str] = ..., positions: _Optional[str] = ..., mup: _Optional[_Union[MupSpec, _Mapping]] = ...) -> None: ...

class MupSpec(_message.Message):
    __slots__ = ("base_hidden_size", "base_head_dim", "output_multiplier", "attention_multiplier", "zero_init_readout", "weight_decay_exponent", "sigma_every_steps")
    BASE_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    ZERO_INIT_READOUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    SIGMA_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    base_hidden_size: int
    base_head_dim: int
    output_multiplier: float
    attention_multiplier: float
    zero_init_readout: bool
    weight_decay_exponent: float
    sigma_every_steps: int
    def __init__(self, base_hidden_size: _Optional[int] = ..., base_head_dim: _Optional[int] = ..., output_multiplier: _Optional[float] = ..., attention_multiplier: _Optional[float] = ..., zero_init_readout: _Optional[bool] = ..., weight_decay_exponent: _Optional[float] = ..., sigma_every_steps: _Optional[int] = ...) -> None: ...

class ParallelismSpec(_message.Message):
    __slots__ = ("tp", "pp", "dp")
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    tp: int
    pp: int
    dp: int
    def __init__(self, tp: _Optional[int] = ..., pp: _Optional[int] = ..., dp: _Optional[int] = ...) -> None: ...

class TrainingSpec(_message.Message):
    __slots__ = ("steps", "global_batch_size", "micro_batch_size", "learning_rate", "lr_schedule", "warmup_steps", "seed", "weight_decay", "eval_interval", "precision", "offload")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    EVAL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    steps: int
    global_batch_size: int
    micro_batch_size: int
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    seed: int
    weight_decay: float
    eval_interval: int
    precision: str
    offload: OffloadSpec
    def __init__(self, steps: _Optional[int] = ..., global_batch_size: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., seed: _Optional[int] = ..., weight_decay: _Optional[float] = ..., eval_interval: _Optional[int] = ..., precision: _Optional[str] = ..., offload: _Optional[_Union[OffloadSpec, _Mapping]] = ...) -> None: ...

class OffloadSpec(_message.Message):
    __slots__ = ("mode", "subgroup_size", "placement", "device_fraction", "cpu_threads", "profile")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SUBGROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CPU_THREADS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    subgroup_size: int
    placement: str
    device_fraction: float
    cpu_threads: int
    profile: str
    def __init__(self, mode: _Optional[str] = ..., subgroup_size: _Optional[int] = ..., placement: _Optional[str] = ..., device_fraction: _Optional[float] = ..., cpu_threads: _Optional[int] = ..., profile: _Optional[str] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ResourcesSpec(_message.Message):
    __slots__ = ("ranks", "min_ranks", "cpu", "memory", "gpus", "accelerator_memory")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MIN_RANKS_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ranks: int
    min_ranks: int
    cpu: str
    memory: str
    gpus: int
    accelerator_memory: str
    def __init__(self, ranks: _Optional[int] = ..., min_ranks: _Optional[int] = ..., cpu: _Optional[str] = ..., memory: _Optional[str] = ..., gpus: _Optional[int] = ..., accelerator_memory: _Optional[str] = ...) -> None: ...

class Toleration(_message.Message):
    __slots__ = ("key", "operator", "value", "effect")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    key: str
    operator: str
    value: str
    effect: str
    def __init__(self, key: _Optional[str] = ..., operator: _Optional[str] = ..., value: _Optional[str] = ..., effect: _Optional[str] = ...) -> None: ...

class KubernetesSpec(_message.Message):
    __slots__ = ("image", "volume_claim", "node_selector", "tolerations", "priority_class", "queue", "ranks_per_pod", "env_from_secrets")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvFromSecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SecretKeyRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SecretKeyRef, _Mapping]] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_CLAIM_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TOLERATIONS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    RANKS_PER_POD_FIELD_NUMBER: _ClassVar[int]
    ENV_FROM_SECRETS_FIELD_NUMBER: _ClassVar[int]
    image: str
    volume_claim: str
    node_selector: _containers.ScalarMap[str, str]
    tolerations: _containers.RepeatedCompositeFieldContainer[Toleration]
    priority_class: str
    queue: str
    ranks_per_pod: int
    env_from_secrets: _containers.MessageMap[str, SecretKeyRef]
    def __init__(self, image: _Optional[str] = ..., volume_claim: _Optional[str] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., tolerations: _Optional[_Iterable[_Union[Toleration, _Mapping]]] = ..., priority_class: _Optional[str] = ..., queue: _Optional[str] = ..., ranks_per_pod: _Optional[int] = ..., env_from_secrets: _Optional[_Mapping[str, SecretKeyRef]] = ...) -> None: ...

class SecretKeyRef(_message.Message):
    __slots__ = ("name", "key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class RestartPolicy(_message.Message):
    __slots__ = ("max_restarts", "max_hang_restarts", "max_preemptions", "hang_timeout_seconds")
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_HANG_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    HANG_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_restarts: int
    max_hang_restarts: int
    max_preemptions: int
    hang_timeout_seconds: float
    def __init__(self, max_restarts: _Optional[int] = ..., max_hang_restarts: _Optional[int] = ..., max_preemptions: _Optional[int] = ..., hang_timeout_seconds: _Optional[float] = ...) -> None: ...

class CheckpointSpec(_message.Message):
    __slots__ = ("directory", "interval", "keep_last", "keep_every", "async_save")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    ASYNC_SAVE_FIELD_NUMBER: _ClassVar[int]
    directory: str
    interval: int
    keep_last: int
    keep_every: int
    async_save: bool
    def __init__(self, directory: _Optional[str] = ..., interval: _Optional[int] = ..., keep_last: _Optional[int] = ..., keep_every: _Optional[int] = ..., async_save: _Optional[bool] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("tp", "pp", "dp")
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    tp: int
    pp: int
    dp: int
    def __init__(self, tp: _Optional[int] = ..., pp: _Optional[int] = ..., dp: _Optional[int] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "state", "layout", "world_size", "start_step", "create_time", "end_time", "end_reason")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: AttemptState
    layout: Layout
    world_size: int
    start_step: int
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    end_reason: str
    def __init__(self, number: _Optional[int] = ..., state: _Optional[_Union[AttemptState, str]] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., world_size: _Optional[int] = ..., start_step: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_reason: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "uid", "spec", "state", "state_reason", "state_message", "owner", "current_step", "total_steps", "last_loss", "tokens_per_second", "restart_count", "cancel_requested", "attempts", "create_time", "update_time", "start_time", "end_time", "checkpoint_step", "hang_restart_count", "preemption_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    HANG_RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    uid: str
    spec: JobSpec
    state: JobState
    state_reason: str
    state_message: str
    owner: str
    current_step: int
    total_steps: int
    last_loss: float
    tokens_per_second: float
    restart_count: int
    cancel_requested: bool
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    checkpoint_step: int
    hang_restart_count: int
    preemption_count: int
    def __init__(self, name: _Optional[str] = ..., uid: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., state_reason: _Optional[str] = ..., state_message: _Optional[str] = ..., owner: _Optional[str] = ..., current_step: _Optional[int] = ..., total_steps: _Optional[int] = ..., last_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., restart_count: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checkpoint_step: _Optional[int] = ..., hang_restart_count: _Optional[int] = ..., preemption_count: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "attempt", "type", "from_state", "to_state", "reason", "message", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    attempt: int
    type: str
    from_state: JobState
    to_state: JobState
    reason: str
    message: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., attempt: _Optional[int] = ..., type: _Optional[str] = ..., from_state: _Optional[_Union[JobState, str]] = ..., to_state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class MetricPoint(_message.Message):
    __slots__ = ("step", "attempt", "rank", "loss", "val_loss", "tokens_per_second", "memory_bytes", "learning_rate", "time", "sigma_max")
    class SigmaMaxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SIGMA_MAX_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    rank: int
    loss: float
    val_loss: float
    tokens_per_second: float
    memory_bytes: int
    learning_rate: float
    time: _timestamp_pb2.Timestamp
    sigma_max: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., learning_rate: _Optional[float] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sigma_max: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "attempt", "layout", "path", "size_bytes", "commit_time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    attempt: int
    layout: Layout
    path: str
    size_bytes: int
    commit_time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., attempt: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., commit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
