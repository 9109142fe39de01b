"""Every architectural and protocol constant lives here, once."""

from __future__ import annotations

PAGE_SIZE = 4096
HUGE_PAGE_ALIGN = 2 << 20  # where guest memory starts, so transparent huge pages can back it
GRANULE_SIZE = 16
GRANULES_PER_PAGE = PAGE_SIZE // GRANULE_SIZE  # 256
TAG_BITS = 4
TAG_MASK = 0xF
# Two 4-bit tags per byte: the layout the kernel keeps and the one on our wire.
PACKED_TAG_BYTES_PER_PAGE = GRANULES_PER_PAGE // 2  # 128
PAGE_STATE_BYTES = PAGE_SIZE + PACKED_TAG_BYTES_PER_PAGE  # a page's data and its tags
# QEMU TCG keeps tags in a RAM block of their own, dirty-tracked per 4 KiB of it: the tags of
# this many data pages (4096 bytes / 128 bytes of packed tags per page).
TCG_TAG_GROUP_PAGES = PAGE_SIZE // PACKED_TAG_BYTES_PER_PAGE

MIN_RAM_BYTES = 1 << 20
MAX_RAM_BYTES = 16 << 30
MAX_VCPUS = 64

# How far a destination's prefault may run ahead of the pages that arrived: the populated-pages
# hint costs a source a few bytes, so what it alone can make a destination commit is bounded.
PREFAULT_LEAD_BYTES = 1 << 30

# The most pages one workload step dirties: a step runs whole between two turns of the daemon's
# loop, so what a control block in guest RAM may ask of one step is bounded (about 40 ms here).
MAX_DIRTY_PAGES_PER_STEP = 4096

# Logical tag of a pointer lives in bits 59:56; bit 55 selects TTBR1 (upper) addresses.
POINTER_TAG_SHIFT = 56
ADDRESS_MASK = (1 << 56) - 1

# SCTLR_EL1 tag-check-fault fields: TCF for EL1, TCF0 for EL0.
SCTLR_TCF_SHIFT = 40
SCTLR_TCF0_SHIFT = 38
TCF_NONE = 0
TCF_SYNC = 1
TCF_ASYNC = 2
TCF_ASYMMETRIC = 3
# TFSR_EL1 / TFSRE0_EL1 sticky bits: TF0 for TTBR0 addresses, TF1 for TTBR1.
TFSR_TF0 = 1 << 0
TFSR_TF1 = 1 << 1
GCR_EXCLUDE_MASK = 0xFFFF
RGSR_SEED_SHIFT = 8
RGSR_SEED_MASK = 0xFFFF

# Digests are computed over blocks of pages (a two-level Merkle tree): a mismatched
# block narrows the search to its pages without hashing every page twice.
DIGEST_BLOCK_PAGES = 256

PROTOCOL_VERSION = 6  # 2: acknowledged, resent and resumable messages; 3: per-page digests;
# 4: tag sections of up to MAX_TAG_SECTIONS_PER_MESSAGE pages; 5: LinkTimeouts, and the fields
# nobody read gone from Ack, EndOfRound and VerifyResult; 6: page requests on the source's urgent
# connection (UrgentReady); PostcopyPages' frame checksum covers its header only
WIRE_MAGIC = b"MTEM"

# Pages per RAM batch message: batching is what makes ZeroMQ fast (see README figures).
# 8 MiB messages: per-message work (framing, protobuf, acks) is an eighth of 1 MiB ones'. Measured
# on 1 GiB into preallocated memory, 2 cores: 8 MiB 10 % faster than 4 MiB, 16 MiB slower again.
PAGES_PER_BATCH = 2048
# Tag sections are 32x smaller than pages, and a message costs both sides about the same whatever
# it carries: 1 MiB of tags per message made a 1 GiB migration 10-20 % faster than 128 KiB.
TAG_SECTIONS_PER_BATCH = 8192
# Parallel channels (QEMU's multifd): the most connections a destination takes page and tag
# batches over; batches that arrive ahead of their turn wait for it, up to the window. A gap
# that persists this long is a lost message (a checksum drop, a reset channel), asked for again.
MAX_CHANNELS = 8
REORDER_WAIT_S = 0.2
# Credits are counted in batch messages; the receiver returns one when a batch is applied.
INITIAL_CREDIT = 16

DEFAULT_DOWNTIME_LIMIT_MS = 300
# Precopy stops the guest as soon as the expected downtime is within this share of the limit;
# between it and the limit, only once another round no longer shrinks the estimate below
# ROUND_WORTH_IT of the last one.
DOWNTIME_AIM = 0.25
ROUND_WORTH_IT = 0.5
HEARTBEAT_INTERVAL_S = 0.5
# On exit a daemon waits this long for its last messages (Started, Abort) to leave.
CLOSE_LINGER_MS = 2000
# Silence after which the link is presumed broken (the source reconnects; setup gives up).
PEER_DEAD_AFTER_S = 3.0
# How long a source goes on reconnecting before it fails (its guest running); a destination
# keeps an unfinished session that long.
RECONNECT_TIMEOUT_S = 10.0
# The longest a destination keeps an unfinished session while its source is silent, unless its
# operator says otherwise (dest-node --max-source-wait): a hello may ask for less, never more,
# so no source decides how long it holds a destination.
MAX_SOURCE_WAIT_S = 120.0
# Resume attempts back off from the first to the last interval.
RECONNECT_BACKOFF_S = (0.1, 1.0)
# A sequenced message unacknowledged this long is sent again.
RETRANSMIT_AFTER_S = 1.0

# Hostile-input bounds: a message larger than these is refused before it is decoded.
MAX_PAGES_PER_MESSAGE = 2048
MAX_TAG_SECTIONS_PER_MESSAGE = 8192  # 1 MiB of packed tags
MAX_FRAME_BYTES = MAX_PAGES_PER_MESSAGE * (PAGE_SIZE + 64) + (1 << 20)
# A QEMU guest's state beside its RAM and tags (device sections, firmware and ROM pages): it
# travels in one device-state message, so it must fit one frame with room to spare.
MAX_FOREIGN_STATE_BYTES = 4 << 20
# lz4 is used for a batch only when a sample of its pages shrinks below this share.
LZ4_SAMPLE_PAGES = 4
LZ4_WORTH_RATIO = 0.8
SESSION_ID_BYTES = 8

# Hostile-input budgets per second: answers to refused messages and hellos (the rest are
# counted, not answered), and the messages a destination drains from peers that are not its
# session's source before it turns to other work.
REFUSAL_ANSWERS_PER_S = 20
# Refusals (hellos, key handshakes) a daemon logs one by one per second; the rest are counted.
REFUSAL_LOG_LINES_PER_S = 5
STRANGER_MESSAGES_PER_TURN = 4
READS_PER_TURN = 64
# Frames of a message: the envelope and, for pages and tags, the payload. More are refused unread.
MAX_FRAMES_PER_MESSAGE = 2

# Messages a daemon takes from its socket per loop turn before the vCPU and timers get a turn.
DRAIN_BUDGET_MESSAGES = 1

# Reports and progress: how many postcopy fault latencies a report keeps for plotting (the
# percentiles cover all), and how often a daemon off a terminal logs its progress.
LATENCY_SAMPLES = 10_000
PROGRESS_LOG_INTERVAL_S = 5.0
PROGRESS_LINE_INTERVAL_S = 0.2
# `ctl events`: how many events a daemon keeps for readers that ask after a pause, and how
# often `ctl events` asks (rounds of a fast migration are milliseconds apart: none is lost,
# they arrive together).
EVENT_LOG_KEEP = 1000
EVENT_POLL_INTERVAL_S = 0.2
# The plot's samples of a migration over time (common/samples.py): how often, and at most how
# many (then every other one goes and the interval doubles).
SAMPLE_INTERVAL_S = 0.1
MAX_SAMPLES = 2000

# How long a thread that wants the interpreter waits for the one holding it (CPython's switch
# interval, 5 ms by default). The postcopy source's urgent thread answers a page request while
# the loop encodes background batches: it waits this long for the interpreter, and the loop
# takes it back after as long again. The interval is the process's: threads of parallel
# channels' encoders also switch this often while it runs.
URGENT_SWITCH_INTERVAL_S = 0.0001
# A source's urgent connection that failed is opened again after this long, not in a loop.
URGENT_RESTART_S = 1.0
# The most a source's urgent connection reads in one message: requests (at most
# MAX_PAGES_PER_MESSAGE page numbers) and refusals.
URGENT_MAX_MESSAGE_BYTES = 64 << 10

# The last byte of the routing id of a source's urgent connection (postcopy page requests and
# answers): the session's id and epoch come before it.
URGENT_SUFFIX = b"U"
