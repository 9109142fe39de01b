from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Feature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_UNSPECIFIED: _ClassVar[Feature]
    FEATURE_MTE: _ClassVar[Feature]
    FEATURE_LZ4: _ClassVar[Feature]
    FEATURE_POSTCOPY: _ClassVar[Feature]
    FEATURE_VERIFY: _ClassVar[Feature]
    FEATURE_MULTI_CHANNEL: _ClassVar[Feature]

class MigrationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[MigrationMode]
    MODE_PRECOPY: _ClassVar[MigrationMode]
    MODE_POSTCOPY: _ClassVar[MigrationMode]

class PageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_ENCODING_UNSPECIFIED: _ClassVar[PageEncoding]
    PAGE_ZERO: _ClassVar[PageEncoding]
    PAGE_RAW: _ClassVar[PageEncoding]
    PAGE_LZ4: _ClassVar[PageEncoding]

class TagEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAG_ENCODING_UNSPECIFIED: _ClassVar[TagEncoding]
    TAG_UNTAGGED: _ClassVar[TagEncoding]
    TAG_UNIFORM: _ClassVar[TagEncoding]
    TAG_RAW: _ClassVar[TagEncoding]
    TAG_LZ4: _ClassVar[TagEncoding]

class QemuBlockRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QEMU_BLOCK_OTHER: _ClassVar[QemuBlockRole]
    QEMU_BLOCK_GUEST_RAM: _ClassVar[QemuBlockRole]
    QEMU_BLOCK_GUEST_TAGS: _ClassVar[QemuBlockRole]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_VERSION_MISMATCH: _ClassVar[ErrorCode]
    ERROR_FEATURE_MISMATCH: _ClassVar[ErrorCode]
    ERROR_GEOMETRY_MISMATCH: _ClassVar[ErrorCode]
    ERROR_BAD_MESSAGE: _ClassVar[ErrorCode]
    ERROR_SEQUENCE_GAP: _ClassVar[ErrorCode]
    ERROR_CHECKSUM: _ClassVar[ErrorCode]
    ERROR_WRONG_SESSION: _ClassVar[ErrorCode]
    ERROR_UNAUTHORIZED: _ClassVar[ErrorCode]
    ERROR_CANCELLED: _ClassVar[ErrorCode]
    ERROR_TIMEOUT: _ClassVar[ErrorCode]
    ERROR_VERIFICATION_FAILED: _ClassVar[ErrorCode]
    ERROR_NOT_CONVERGING: _ClassVar[ErrorCode]
    ERROR_BUSY: _ClassVar[ErrorCode]
    ERROR_INTERNAL: _ClassVar[ErrorCode]
    ERROR_GUEST_TAKEN_BACK: _ClassVar[ErrorCode]
FEATURE_UNSPECIFIED: Feature
FEATURE_MTE: Feature
FEATURE_LZ4: Feature
FEATURE_POSTCOPY: Feature
FEATURE_VERIFY: Feature
FEATURE_MULTI_CHANNEL: Feature
MODE_UNSPECIFIED: MigrationMode
MODE_PRECOPY: MigrationMode
MODE_POSTCOPY: MigrationMode
PAGE_ENCODING_UNSPECIFIED: PageEncoding
PAGE_ZERO: PageEncoding
PAGE_RAW: PageEncoding
PAGE_LZ4: PageEncoding
TAG_ENCODING_UNSPECIFIED: TagEncoding
TAG_UNTAGGED: TagEncoding
TAG_UNIFORM: TagEncoding
TAG_RAW: TagEncoding
TAG_LZ4: TagEncoding
QEMU_BLOCK_OTHER: QemuBlockRole
QEMU_BLOCK_GUEST_RAM: QemuBlockRole
QEMU_BLOCK_GUEST_TAGS: QemuBlockRole
ERROR_UNSPECIFIED: ErrorCode
ERROR_VERSION_MISMATCH: ErrorCode
ERROR_FEATURE_MISMATCH: ErrorCode
ERROR_GEOMETRY_MISMATCH: ErrorCode
ERROR_BAD_MESSAGE: ErrorCode
ERROR_SEQUENCE_GAP: ErrorCode
ERROR_CHECKSUM: ErrorCode
ERROR_WRONG_SESSION: ErrorCode
ERROR_UNAUTHORIZED: ErrorCode
ERROR_CANCELLED: ErrorCode
ERROR_TIMEOUT: ErrorCode
ERROR_VERIFICATION_FAILED: ErrorCode
ERROR_NOT_CONVERGING: ErrorCode
ERROR_BUSY: ErrorCode
ERROR_INTERNAL: ErrorCode
ERROR_GUEST_TAKEN_BACK: ErrorCode

class Hello(_message.Message):
    __slots__ = ("protocol_version", "page_size", "granule_size", "ram_bytes", "features", "mode", "vcpu_count", "node_name", "auth_token", "populated_hint_lz4", "reconnect_timeout_ms", "postcopy_recover_timeout_ms", "channels")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRANULE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POPULATED_HINT_LZ4_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_RECOVER_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    page_size: int
    granule_size: int
    ram_bytes: int
    features: _containers.RepeatedScalarFieldContainer[Feature]
    mode: MigrationMode
    vcpu_count: int
    node_name: str
    auth_token: bytes
    populated_hint_lz4: bytes
    reconnect_timeout_ms: int
    postcopy_recover_timeout_ms: int
    channels: int
    def __init__(self, protocol_version: _Optional[int] = ..., page_size: _Optional[int] = ..., granule_size: _Optional[int] = ..., ram_bytes: _Optional[int] = ..., features: _Optional[_Iterable[_Union[Feature, str]]] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., vcpu_count: _Optional[int] = ..., node_name: _Optional[str] = ..., auth_token: _Optional[bytes] = ..., populated_hint_lz4: _Optional[bytes] = ..., reconnect_timeout_ms: _Optional[int] = ..., postcopy_recover_timeout_ms: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class HelloAck(_message.Message):
    __slots__ = ("accepted", "reason", "protocol_version", "features", "initial_credit", "code", "channels")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_CREDIT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    protocol_version: int
    features: _containers.RepeatedScalarFieldContainer[Feature]
    initial_credit: int
    code: ErrorCode
    channels: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., protocol_version: _Optional[int] = ..., features: _Optional[_Iterable[_Union[Feature, str]]] = ..., initial_credit: _Optional[int] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., channels: _Optional[int] = ...) -> None: ...

class RamPages(_message.Message):
    __slots__ = ("round", "pages", "encodings", "lengths", "digests")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages: bytes
    encodings: bytes
    lengths: bytes
    digests: bytes
    def __init__(self, round: _Optional[int] = ..., pages: _Optional[bytes] = ..., encodings: _Optional[bytes] = ..., lengths: _Optional[bytes] = ..., digests: _Optional[bytes] = ...) -> None: ...

class TagSections(_message.Message):
    __slots__ = ("round", "pages", "encodings", "lengths")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages: bytes
    encodings: bytes
    lengths: bytes
    def __init__(self, round: _Optional[int] = ..., pages: _Optional[bytes] = ..., encodings: _Optional[bytes] = ..., lengths: _Optional[bytes] = ...) -> None: ...

class EndOfRound(_message.Message):
    __slots__ = ("round", "final")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    final: bool
    def __init__(self, round: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class VcpuState(_message.Message):
    __slots__ = ("index", "x", "sp", "pc", "pstate", "sctlr_el1", "gcr_el1", "rgsr_el1", "tfsr_el1", "tfsre0_el1")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SP_FIELD_NUMBER: _ClassVar[int]
    PC_FIELD_NUMBER: _ClassVar[int]
    PSTATE_FIELD_NUMBER: _ClassVar[int]
    SCTLR_EL1_FIELD_NUMBER: _ClassVar[int]
    GCR_EL1_FIELD_NUMBER: _ClassVar[int]
    RGSR_EL1_FIELD_NUMBER: _ClassVar[int]
    TFSR_EL1_FIELD_NUMBER: _ClassVar[int]
    TFSRE0_EL1_FIELD_NUMBER: _ClassVar[int]
    index: int
    x: _containers.RepeatedScalarFieldContainer[int]
    sp: int
    pc: int
    pstate: int
    sctlr_el1: int
    gcr_el1: int
    rgsr_el1: int
    tfsr_el1: int
    tfsre0_el1: int
    def __init__(self, index: _Optional[int] = ..., x: _Optional[_Iterable[int]] = ..., sp: _Optional[int] = ..., pc: _Optional[int] = ..., pstate: _Optional[int] = ..., sctlr_el1: _Optional[int] = ..., gcr_el1: _Optional[int] = ..., rgsr_el1: _Optional[int] = ..., tfsr_el1: _Optional[int] = ..., tfsre0_el1: _Optional[int] = ...) -> None: ...

class DeviceState(_message.Message):
    __slots__ = ("vcpus", "qemu_state")
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    QEMU_STATE_FIELD_NUMBER: _ClassVar[int]
    vcpus: _containers.RepeatedCompositeFieldContainer[VcpuState]
    qemu_state: bytes
    def __init__(self, vcpus: _Optional[_Iterable[_Union[VcpuState, _Mapping]]] = ..., qemu_state: _Optional[bytes] = ...) -> None: ...

class QemuState(_message.Message):
    __slots__ = ("configuration", "ram_section_id", "ram_instance_id", "ram_version_id", "blocks", "device_tail")
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    RAM_SECTION_ID_FIELD_NUMBER: _ClassVar[int]
    RAM_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RAM_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TAIL_FIELD_NUMBER: _ClassVar[int]
    configuration: bytes
    ram_section_id: int
    ram_instance_id: int
    ram_version_id: int
    blocks: _containers.RepeatedCompositeFieldContainer[QemuBlock]
    device_tail: bytes
    def __init__(self, configuration: _Optional[bytes] = ..., ram_section_id: _Optional[int] = ..., ram_instance_id: _Optional[int] = ..., ram_version_id: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[QemuBlock, _Mapping]]] = ..., device_tail: _Optional[bytes] = ...) -> None: ...

class QemuBlock(_message.Message):
    __slots__ = ("name", "length", "role", "page_numbers", "pages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PAGE_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    role: QemuBlockRole
    page_numbers: bytes
    pages: bytes
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ..., role: _Optional[_Union[QemuBlockRole, str]] = ..., page_numbers: _Optional[bytes] = ..., pages: _Optional[bytes] = ...) -> None: ...

class PageRequest(_message.Message):
    __slots__ = ("page_index",)
    PAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    page_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, page_index: _Optional[_Iterable[int]] = ...) -> None: ...

class PostcopyPages(_message.Message):
    __slots__ = ("data", "tags", "data_bytes", "requested", "source_held_us")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HELD_US_FIELD_NUMBER: _ClassVar[int]
    data: RamPages
    tags: TagSections
    data_bytes: int
    requested: bool
    source_held_us: int
    def __init__(self, data: _Optional[_Union[RamPages, _Mapping]] = ..., tags: _Optional[_Union[TagSections, _Mapping]] = ..., data_bytes: _Optional[int] = ..., requested: _Optional[bool] = ..., source_held_us: _Optional[int] = ...) -> None: ...

class UrgentReady(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PostcopyStart(_message.Message):
    __slots__ = ("page_count", "source_downtime_us")
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DOWNTIME_US_FIELD_NUMBER: _ClassVar[int]
    page_count: int
    source_downtime_us: int
    def __init__(self, page_count: _Optional[int] = ..., source_downtime_us: _Optional[int] = ...) -> None: ...

class ReceivedBitmap(_message.Message):
    __slots__ = ("page_count", "bitmap_lz4", "complete", "destination_downtime_us")
    PAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    BITMAP_LZ4_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_DOWNTIME_US_FIELD_NUMBER: _ClassVar[int]
    page_count: int
    bitmap_lz4: bytes
    complete: bool
    destination_downtime_us: int
    def __init__(self, page_count: _Optional[int] = ..., bitmap_lz4: _Optional[bytes] = ..., complete: _Optional[bool] = ..., destination_downtime_us: _Optional[int] = ...) -> None: ...

class GuestDigests(_message.Message):
    __slots__ = ("ram_digest", "tag_digest", "vcpu_digest", "ram_block_digests", "tag_block_digests")
    RAM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VCPU_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RAM_BLOCK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    TAG_BLOCK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    ram_digest: bytes
    tag_digest: bytes
    vcpu_digest: bytes
    ram_block_digests: bytes
    tag_block_digests: bytes
    def __init__(self, ram_digest: _Optional[bytes] = ..., tag_digest: _Optional[bytes] = ..., vcpu_digest: _Optional[bytes] = ..., ram_block_digests: _Optional[bytes] = ..., tag_block_digests: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("source", "attempt")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    source: GuestDigests
    attempt: int
    def __init__(self, source: _Optional[_Union[GuestDigests, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class PageDigests(_message.Message):
    __slots__ = ("first_page", "ram_digests", "tag_digests")
    FIRST_PAGE_FIELD_NUMBER: _ClassVar[int]
    RAM_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    TAG_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    first_page: int
    ram_digests: bytes
    tag_digests: bytes
    def __init__(self, first_page: _Optional[int] = ..., ram_digests: _Optional[bytes] = ..., tag_digests: _Optional[bytes] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("ok", "destination", "page_digests", "vcpu_mismatch", "attempt")
    OK_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PAGE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    VCPU_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    destination: GuestDigests
    page_digests: _containers.RepeatedCompositeFieldContainer[PageDigests]
    vcpu_mismatch: bool
    attempt: int
    def __init__(self, ok: _Optional[bool] = ..., destination: _Optional[_Union[GuestDigests, _Mapping]] = ..., page_digests: _Optional[_Iterable[_Union[PageDigests, _Mapping]]] = ..., vcpu_mismatch: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("source_downtime_us",)
    SOURCE_DOWNTIME_US_FIELD_NUMBER: _ClassVar[int]
    source_downtime_us: int
    def __init__(self, source_downtime_us: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("step", "destination_downtime_us")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_DOWNTIME_US_FIELD_NUMBER: _ClassVar[int]
    step: int
    destination_downtime_us: int
    def __init__(self, step: _Optional[int] = ..., destination_downtime_us: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("resend_from",)
    RESEND_FROM_FIELD_NUMBER: _ClassVar[int]
    resend_from: int
    def __init__(self, resend_from: _Optional[int] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("epoch", "last_received")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    last_received: int
    def __init__(self, epoch: _Optional[int] = ..., last_received: _Optional[int] = ...) -> None: ...

class ResumeAck(_message.Message):
    __slots__ = ("epoch", "last_received", "guest_running")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    GUEST_RUNNING_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    last_received: int
    guest_running: bool
    def __init__(self, epoch: _Optional[int] = ..., last_received: _Optional[int] = ..., guest_running: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkTimeouts(_message.Message):
    __slots__ = ("reconnect_timeout_ms", "postcopy_recover_timeout_ms")
    RECONNECT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_RECOVER_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    reconnect_timeout_ms: int
    postcopy_recover_timeout_ms: int
    def __init__(self, reconnect_timeout_ms: _Optional[int] = ..., postcopy_recover_timeout_ms: _Optional[int] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    reason: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("protocol_version", "session_id", "seq", "received", "epoch", "hello", "hello_ack", "ram_pages", "tag_sections", "end_of_round", "device_state", "page_request", "postcopy_pages", "received_bitmap", "verify_request", "verify_result", "commit", "started", "ack", "heartbeat", "abort", "resume", "resume_ack", "page_manifest", "postcopy_start", "link_timeouts", "urgent_ready")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HELLO_ACK_FIELD_NUMBER: _ClassVar[int]
    RAM_PAGES_FIELD_NUMBER: _ClassVar[int]
    TAG_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    END_OF_ROUND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_PAGES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BITMAP_FIELD_NUMBER: _ClassVar[int]
    VERIFY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    VERIFY_RESULT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESUME_ACK_FIELD_NUMBER: _ClassVar[int]
    PAGE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    POSTCOPY_START_FIELD_NUMBER: _ClassVar[int]
    LINK_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    URGENT_READY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    seq: int
    received: int
    epoch: int
    hello: Hello
    hello_ack: HelloAck
    ram_pages: RamPages
    tag_sections: TagSections
    end_of_round: EndOfRound
    device_state: DeviceState
    page_request: PageRequest
    postcopy_pages: PostcopyPages
    received_bitmap: ReceivedBitmap
    verify_request: VerifyRequest
    verify_result: VerifyResult
    commit: Commit
    started: Started
    ack: Ack
    heartbeat: Heartbeat
    abort: Abort
    resume: Resume
    resume_ack: ResumeAck
    page_manifest: PageDigests
    postcopy_start: PostcopyStart
    link_timeouts: LinkTimeouts
    urgent_ready: UrgentReady
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., received: _Optional[int] = ..., epoch: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., hello_ack: _Optional[_Union[HelloAck, _Mapping]] = ..., ram_pages: _Optional[_Union[RamPages, _Mapping]] = ..., tag_sections: _Optional[_Union[TagSections, _Mapping]] = ..., end_of_round: _Optional[_Union[EndOfRound, _Mapping]] = ..., device_state: _Optional[_Union[DeviceState, _Mapping]] = ..., page_request: _Optional[_Union[PageRequest, _Mapping]] = ..., postcopy_pages: _Optional[_Union[PostcopyPages, _Mapping]] = ..., received_bitmap: _Optional[_Union[ReceivedBitmap, _Mapping]] = ..., verify_request: _Optional[_Union[VerifyRequest, _Mapping]] = ..., verify_result: _Optional[_Union[VerifyResult, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., resume_ack: _Optional[_Union[ResumeAck, _Mapping]] = ..., page_manifest: _Optional[_Union[PageDigests, _Mapping]] = ..., postcopy_start: _Optional[_Union[PostcopyStart, _Mapping]] = ..., link_timeouts: _Optional[_Union[LinkTimeouts, _Mapping]] = ..., urgent_ready: _Optional[_Union[UrgentReady, _Mapping]] = ...) -> None: ...
