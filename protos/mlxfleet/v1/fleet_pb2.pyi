from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_LAPTOP: _ClassVar[Role]
    ROLE_SERVER: _ClassVar[Role]

class MemoryPressure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_PRESSURE_UNSPECIFIED: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_NORMAL: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_WARNING: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_CRITICAL: _ClassVar[MemoryPressure]

class ThermalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THERMAL_STATE_UNSPECIFIED: _ClassVar[ThermalState]
    THERMAL_STATE_NOMINAL: _ClassVar[ThermalState]
    THERMAL_STATE_FAIR: _ClassVar[ThermalState]
    THERMAL_STATE_SERIOUS: _ClassVar[ThermalState]
    THERMAL_STATE_CRITICAL: _ClassVar[ThermalState]

class PowerSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POWER_SOURCE_UNSPECIFIED: _ClassVar[PowerSource]
    POWER_SOURCE_AC: _ClassVar[PowerSource]
    POWER_SOURCE_BATTERY: _ClassVar[PowerSource]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_INTERACTIVE: _ClassVar[Tier]
    TIER_BATCH: _ClassVar[Tier]

class EngineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENGINE_STATE_UNSPECIFIED: _ClassVar[EngineState]
    ENGINE_STATE_STARTING: _ClassVar[EngineState]
    ENGINE_STATE_READY: _ClassVar[EngineState]
    ENGINE_STATE_STOPPING: _ClassVar[EngineState]
    ENGINE_STATE_EXITED: _ClassVar[EngineState]

class ExitReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXIT_REASON_UNSPECIFIED: _ClassVar[ExitReason]
    EXIT_REASON_CLEAN: _ClassVar[ExitReason]
    EXIT_REASON_CRASH: _ClassVar[ExitReason]
    EXIT_REASON_SIGKILL: _ClassVar[ExitReason]
    EXIT_REASON_OOM: _ClassVar[ExitReason]
    EXIT_REASON_HUNG: _ClassVar[ExitReason]
ROLE_UNSPECIFIED: Role
ROLE_LAPTOP: Role
ROLE_SERVER: Role
MEMORY_PRESSURE_UNSPECIFIED: MemoryPressure
MEMORY_PRESSURE_NORMAL: MemoryPressure
MEMORY_PRESSURE_WARNING: MemoryPressure
MEMORY_PRESSURE_CRITICAL: MemoryPressure
THERMAL_STATE_UNSPECIFIED: ThermalState
THERMAL_STATE_NOMINAL: ThermalState
THERMAL_STATE_FAIR: ThermalState
THERMAL_STATE_SERIOUS: ThermalState
THERMAL_STATE_CRITICAL: ThermalState
POWER_SOURCE_UNSPECIFIED: PowerSource
POWER_SOURCE_AC: PowerSource
POWER_SOURCE_BATTERY: PowerSource
TIER_UNSPECIFIED: Tier
TIER_INTERACTIVE: Tier
TIER_BATCH: Tier
ENGINE_STATE_UNSPECIFIED: EngineState
ENGINE_STATE_STARTING: EngineState
ENGINE_STATE_READY: EngineState
ENGINE_STATE_STOPPING: EngineState
ENGINE_STATE_EXITED: EngineState
EXIT_REASON_UNSPECIFIED: ExitReason
EXIT_REASON_CLEAN: ExitReason
EXIT_REASON_CRASH: ExitReason
EXIT_REASON_SIGKILL: ExitReason
EXIT_REASON_OOM: ExitReason
EXIT_REASON_HUNG: ExitReason

class EnrollRequest(_message.Message):
    __slots__ = ("token", "node_id", "facts", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    node_id: str
    facts: NodeFacts
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., node_id: _Optional[str] = ..., facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("node_id", "certificate_pem", "fleet_ca_pem")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    FLEET_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    certificate_pem: bytes
    fleet_ca_pem: bytes
    def __init__(self, node_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., fleet_ca_pem: _Optional[bytes] = ...) -> None: ...

class NodeFacts(_message.Message):
    __slots__ = ("hostname", "chip", "os", "ram_bytes", "performance_cores", "gpu_cores", "memory_bandwidth_gbps", "gpu_wired_limit_bytes", "mlx_version", "mlx_lm_version", "agent_version", "role", "labels", "serve_interactive", "os_reserve_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    PERFORMANCE_CORES_FIELD_NUMBER: _ClassVar[int]
    GPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BANDWIDTH_GBPS_FIELD_NUMBER: _ClassVar[int]
    GPU_WIRED_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MLX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MLX_LM_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SERVE_INTERACTIVE_FIELD_NUMBER: _ClassVar[int]
    OS_RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    chip: str
    os: str
    ram_bytes: int
    performance_cores: int
    gpu_cores: int
    memory_bandwidth_gbps: float
    gpu_wired_limit_bytes: int
    mlx_version: str
    mlx_lm_version: str
    agent_version: str
    role: Role
    labels: _containers.ScalarMap[str, str]
    serve_interactive: bool
    os_reserve_bytes: int
    def __init__(self, hostname: _Optional[str] = ..., chip: _Optional[str] = ..., os: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., performance_cores: _Optional[int] = ..., gpu_cores: _Optional[int] = ..., memory_bandwidth_gbps: _Optional[float] = ..., gpu_wired_limit_bytes: _Optional[int] = ..., mlx_version: _Optional[str] = ..., mlx_lm_version: _Optional[str] = ..., agent_version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., serve_interactive: _Optional[bool] = ..., os_reserve_bytes: _Optional[int] = ...) -> None: ...

class TierKnobs(_message.Message):
    __slots__ = ("max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit")
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    BATCH_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    max_concurrency: int
    batch_window_ms: int
    max_batch_size: int
    queue_limit: int
    def __init__(self, max_concurrency: _Optional[int] = ..., batch_window_ms: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., queue_limit: _Optional[int] = ...) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("engine_id", "model", "tier", "state", "url", "secret", "context_length", "group_id", "rank", "group_split", "group_nodes")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_SPLIT_FIELD_NUMBER: _ClassVar[int]
    GROUP_NODES_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    model: str
    tier: Tier
    state: EngineState
    url: str
    secret: str
    context_length: int
    group_id: str
    rank: int
    group_split: _containers.RepeatedScalarFieldContainer[int]
    group_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, engine_id: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., state: _Optional[_Union[EngineState, str]] = ..., url: _Optional[str] = ..., secret: _Optional[str] = ..., context_length: _Optional[int] = ..., group_id: _Optional[str] = ..., rank: _Optional[int] = ..., group_split: _Optional[_Iterable[int]] = ..., group_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("engine_id", "state", "rss_bytes", "pid")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    state: EngineState
    rss_bytes: int
    pid: int
    def __init__(self, engine_id: _Optional[str] = ..., state: _Optional[_Union[EngineState, str]] = ..., rss_bytes: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("seq", "unix_time", "available_bytes", "swap_used_bytes", "memory_pressure", "thermal_state", "power_source", "low_power_mode", "engines", "disk_room_bytes", "held_models", "copies")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    THERMAL_STATE_FIELD_NUMBER: _ClassVar[int]
    POWER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOW_POWER_MODE_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    DISK_ROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    HELD_MODELS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    unix_time: float
    available_bytes: int
    swap_used_bytes: int
    memory_pressure: MemoryPressure
    thermal_state: ThermalState
    power_source: PowerSource
    low_power_mode: bool
    engines: _containers.RepeatedCompositeFieldContainer[EngineStatus]
    disk_room_bytes: int
    held_models: _containers.RepeatedCompositeFieldContainer[HeldModel]
    copies: _containers.RepeatedCompositeFieldContainer[ModelCopy]
    def __init__(self, seq: _Optional[int] = ..., unix_time: _Optional[float] = ..., available_bytes: _Optional[int] = ..., swap_used_bytes: _Optional[int] = ..., memory_pressure: _Optional[_Union[MemoryPressure, str]] = ..., thermal_state: _Optional[_Union[ThermalState, str]] = ..., power_source: _Optional[_Union[PowerSource, str]] = ..., low_power_mode: _Optional[bool] = ..., engines: _Optional[_Iterable[_Union[EngineStatus, _Mapping]]] = ..., disk_room_bytes: _Optional[int] = ..., held_models: _Optional[_Iterable[_Union[HeldModel, _Mapping]]] = ..., copies: _Optional[_Iterable[_Union[ModelCopy, _Mapping]]] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("source", "files")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    source: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, source: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class FileHolder(_message.Message):
    __slots__ = ("node_id", "url")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    url: str
    def __init__(self, node_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class HeldModel(_message.Message):
    __slots__ = ("source", "manifest_sha256", "bytes", "in_use", "evictable")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    EVICTABLE_FIELD_NUMBER: _ClassVar[int]
    source: str
    manifest_sha256: str
    bytes: int
    in_use: bool
    evictable: bool
    def __init__(self, source: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., in_use: _Optional[bool] = ..., evictable: _Optional[bool] = ...) -> None: ...

class ModelCopy(_message.Message):
    __slots__ = ("source", "bytes_done", "bytes_total", "bytes_per_s", "origin", "from_nodes")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    FROM_NODES_FIELD_NUMBER: _ClassVar[int]
    source: str
    bytes_done: int
    bytes_total: int
    bytes_per_s: float
    origin: str
    from_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_per_s: _Optional[float] = ..., origin: _Optional[str] = ..., from_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class EngineEvent(_message.Message):
    __slots__ = ("kind", "engine", "exit_reason", "exit_code", "signal", "detail")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[EngineEvent.Kind]
        KIND_STARTED: _ClassVar[EngineEvent.Kind]
        KIND_READY: _ClassVar[EngineEvent.Kind]
        KIND_EXITED: _ClassVar[EngineEvent.Kind]
        KIND_LOAD_FAILED: _ClassVar[EngineEvent.Kind]
    KIND_UNSPECIFIED: EngineEvent.Kind
    KIND_STARTED: EngineEvent.Kind
    KIND_READY: EngineEvent.Kind
    KIND_EXITED: EngineEvent.Kind
    KIND_LOAD_FAILED: EngineEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: EngineEvent.Kind
    engine: EngineInfo
    exit_reason: ExitReason
    exit_code: int
    signal: int
    detail: str
    def __init__(self, kind: _Optional[_Union[EngineEvent.Kind, str]] = ..., engine: _Optional[_Union[EngineInfo, _Mapping]] = ..., exit_reason: _Optional[_Union[ExitReason, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("facts", "engines", "metrics_port", "files_url", "link_address")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    FILES_URL_FIELD_NUMBER: _ClassVar[int]
    LINK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    facts: NodeFacts
    engines: _containers.RepeatedCompositeFieldContainer[EngineInfo]
    metrics_port: int
    files_url: str
    link_address: str
    def __init__(self, facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., engines: _Optional[_Iterable[_Union[EngineInfo, _Mapping]]] = ..., metrics_port: _Optional[int] = ..., files_url: _Optional[str] = ..., link_address: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "status", "event", "manifest")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    status: NodeStatus
    event: EngineEvent
    manifest: ModelManifest
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., status: _Optional[_Union[NodeStatus, _Mapping]] = ..., event: _Optional[_Union[EngineEvent, _Mapping]] = ..., manifest: _Optional[_Union[ModelManifest, _Mapping]] = ...) -> None: ...

class LoadModel(_message.Message):
    __slots__ = ("engine_id", "model", "source", "tier", "context_length", "knobs", "kv_bits", "kv_group_size", "prefix_cache_mib", "manifest", "holders", "group")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    KV_BITS_FIELD_NUMBER: _ClassVar[int]
    KV_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_MIB_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    model: str
    source: str
    tier: Tier
    context_length: int
    knobs: TierKnobs
    kv_bits: int
    kv_group_size: int
    prefix_cache_mib: int
    manifest: ModelManifest
    holders: _containers.RepeatedCompositeFieldContainer[FileHolder]
    group: EngineGroup
    def __init__(self, engine_id: _Optional[str] = ..., model: _Optional[str] = ..., source: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., context_length: _Optional[int] = ..., knobs: _Optional[_Union[TierKnobs, _Mapping]] = ..., kv_bits: _Optional[int] = ..., kv_group_size: _Optional[int] = ..., prefix_cache_mib: _Optional[int] = ..., manifest: _Optional[_Union[ModelManifest, _Mapping]] = ..., holders: _Optional[_Iterable[_Union[FileHolder, _Mapping]]] = ..., group: _Optional[_Union[EngineGroup, _Mapping]] = ...) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("rank", "node_id", "link_address", "first_layer", "layers")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LINK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_id: str
    link_address: str
    first_layer: int
    layers: int
    def __init__(self, rank: _Optional[int] = ..., node_id: _Optional[str] = ..., link_address: _Optional[str] = ..., first_layer: _Optional[int] = ..., layers: _Optional[int] = ...) -> None: ...

class EngineGroup(_message.Message):
    __slots__ = ("group_id", "rank", "members", "stall_s")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    rank: int
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    stall_s: float
    def __init__(self, group_id: _Optional[str] = ..., rank: _Optional[int] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., stall_s: _Optional[float] = ...) -> None: ...

class UnloadModel(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetKnobs(_message.Message):
    __slots__ = ("engine_id", "knobs")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    knobs: TierKnobs
    def __init__(self, engine_id: _Optional[str] = ..., knobs: _Optional[_Union[TierKnobs, _Mapping]] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("load", "unload", "drain", "set_knobs")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    SET_KNOBS_FIELD_NUMBER: _ClassVar[int]
    load: LoadModel
    unload: UnloadModel
    drain: Drain
    set_knobs: SetKnobs
    def __init__(self, load: _Optional[_Union[LoadModel, _Mapping]] = ..., unload: _Optional[_Union[UnloadModel, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., set_knobs: _Optional[_Union[SetKnobs, _Mapping]] = ...) -> None: ...
