from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_HOST: _ClassVar[Residency]
    RESIDENCY_LOADING: _ClassVar[Residency]
    RESIDENCY_DEVICE: _ClassVar[Residency]
    RESIDENCY_DISK: _ClassVar[Residency]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_WAITING: _ClassVar[Phase]
    PHASE_PREFILL: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_HOST: Residency
RESIDENCY_LOADING: Residency
RESIDENCY_DEVICE: Residency
RESIDENCY_DISK: Residency
PHASE_UNSPECIFIED: Phase
PHASE_WAITING: Phase
PHASE_PREFILL: Phase
PHASE_DECODE: Phase

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "adapter_id", "sampling", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    adapter_id: str
    sampling: SamplingParams
    request_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., adapter_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class RequestMetrics(_message.Message):
    __slots__ = ("ttft_s", "tpot_s", "latency_s", "prompt_tokens", "output_tokens", "cpu_prefill_tokens", "cpu_decode_tokens", "cold_start", "cold_start_path", "stalled_s", "worker")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CPU_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CPU_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    COLD_START_PATH_FIELD_NUMBER: _ClassVar[int]
    STALLED_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    latency_s: float
    prompt_tokens: int
    output_tokens: int
    cpu_prefill_tokens: int
    cpu_decode_tokens: int
    cold_start: bool
    cold_start_path: str
    stalled_s: float
    worker: str
    def __init__(self, ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., latency_s: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cpu_prefill_tokens: _Optional[int] = ..., cpu_decode_tokens: _Optional[int] = ..., cold_start: _Optional[bool] = ..., cold_start_path: _Optional[str] = ..., stalled_s: _Optional[float] = ..., worker: _Optional[str] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "adapter_id", "metrics")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    adapter_id: str
    metrics: RequestMetrics
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., adapter_id: _Optional[str] = ..., metrics: _Optional[_Union[RequestMetrics, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "result")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    result: GenerateResult
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "rank", "bytes", "where", "pinned", "in_use", "path", "target_modules")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    rank: int
    bytes: int
    where: Residency
    pinned: bool
    in_use: int
    path: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., rank: _Optional[int] = ..., bytes: _Optional[int] = ..., where: _Optional[_Union[Residency, str]] = ..., pinned: _Optional[bool] = ..., in_use: _Optional[int] = ..., path: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "pin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    pin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestState(_message.Message):
    __slots__ = ("request_id", "adapter_id", "rank", "phase", "prompt_tokens", "computed_tokens", "output_tokens", "max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter_id: str
    rank: int
    phase: Phase
    prompt_tokens: int
    computed_tokens: int
    output_tokens: int
    max_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., rank: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., prompt_tokens: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class AdapterMemory(_message.Message):
    __slots__ = ("device_budget_bytes", "device_bytes_used", "page_bytes", "page_rank", "pages_total", "pages_free", "slots_total", "slots_free", "host_budget_bytes", "host_bytes_used", "host_adapters", "disk_adapters", "disk_read_bytes_per_s", "disk_read_latency_s")
    DEVICE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_RANK_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FREE_FIELD_NUMBER: _ClassVar[int]
    HOST_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DISK_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    device_budget_bytes: int
    device_bytes_used: int
    page_bytes: int
    page_rank: int
    pages_total: int
    pages_free: int
    slots_total: int
    slots_free: int
    host_budget_bytes: int
    host_bytes_used: int
    host_adapters: int
    disk_adapters: int
    disk_read_bytes_per_s: float
    disk_read_latency_s: float
    def __init__(self, device_budget_bytes: _Optional[int] = ..., device_bytes_used: _Optional[int] = ..., page_bytes: _Optional[int] = ..., page_rank: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., slots_total: _Optional[int] = ..., slots_free: _Optional[int] = ..., host_budget_bytes: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_adapters: _Optional[int] = ..., disk_adapters: _Optional[int] = ..., disk_read_bytes_per_s: _Optional[float] = ..., disk_read_latency_s: _Optional[float] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("steps", "requests", "prompt_tokens", "output_tokens", "cpu_prefill_tokens", "cold_starts")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ColdStartsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CPU_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLD_STARTS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    requests: _containers.ScalarMap[str, int]
    prompt_tokens: int
    output_tokens: int
    cpu_prefill_tokens: int
    cold_starts: _containers.ScalarMap[str, int]
    def __init__(self, steps: _Optional[int] = ..., requests: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cpu_prefill_tokens: _Optional[int] = ..., cold_starts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker", "model", "cold_start_policy", "emulated_link", "serving", "max_batch_size", "max_queue", "max_lora_rank", "max_seq_len", "waiting", "running", "queued", "memory", "adapters", "counters", "uptime_s", "cost_model", "adapters_registered", "adapters_version")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COLD_START_POLICY_FIELD_NUMBER: _ClassVar[int]
    EMULATED_LINK_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker: str
    model: str
    cold_start_policy: str
    emulated_link: bool
    serving: bool
    max_batch_size: int
    max_queue: int
    max_lora_rank: int
    max_seq_len: int
    waiting: int
    running: _containers.RepeatedCompositeFieldContainer[RequestState]
    queued: _containers.RepeatedCompositeFieldContainer[RequestState]
    memory: AdapterMemory
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    counters: Counters
    uptime_s: float
    cost_model: str
    adapters_registered: int
    adapters_version: int
    def __init__(self, worker: _Optional[str] = ..., model: _Optional[str] = ..., cold_start_policy: _Optional[str] = ..., emulated_link: _Optional[bool] = ..., serving: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., waiting: _Optional[int] = ..., running: _Optional[_Iterable[_Union[RequestState, _Mapping]]] = ..., queued: _Optional[_Iterable[_Union[RequestState, _Mapping]]] = ..., memory: _Optional[_Union[AdapterMemory, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., uptime_s: _Optional[float] = ..., cost_model: _Optional[str] = ..., adapters_registered: _Optional[int] = ..., adapters_version: _Optional[int] = ...) -> None: ...
