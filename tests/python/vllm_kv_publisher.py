"""A KV-event publisher speaking vLLM's exact wire format, for the ZeroMQ KV-event test
(nodes/engines/tests/zmq_kv_events.rs).

The structs below are written from vLLM 0.33.0's `vllm/distributed/kv_events.py` (the
PyPI wheel; file sha256 82b362a0a7f89318d9127addfce254d537f5078a31aa87beb08493b0953895ee)
and encoded with msgspec, the library vLLM encodes them with, so the bytes are vLLM's:
`EventBatch` is array_like, events are tagged structs (maps with a "type" key), block
hashes are bytes. Each message is vLLM's three frames: topic, the sequence number as 8
big-endian bytes, the payload.

    python vllm_kv_publisher.py PORT TOKENS_CSV [REPLAY_PORT]

It binds tcp://127.0.0.1:PORT (an XPUB, so it can wait until the subscriber's
subscription arrives instead of sleeping; on the wire it is a PUB), then publishes, one
step per line read on stdin ("next"):
  step 1: seq 0 BlockStored blocks 0-1 (root); seq 1 BlockStored block 2 (child of 1)
  step 2: seq 2 BlockRemoved block 2
  step 3: seq 5 BlockStored block 0 again; seqs 3 (BlockStored block 2 again, child of
          1) and 4 (BlockRemoved block 0) are made but never published: a gap
and prints "published N" after each step; it exits when stdin closes.

With REPLAY_PORT it also serves vLLM's replay socket on tcp://127.0.0.1:REPLAY_PORT, as
vLLM's ZmqEventPublisher does: a ROUTER that reads [identity, empty, start seq (8 bytes
big-endian)] and answers every buffered batch from that seq on as [identity, empty, seq,
payload], then [identity, empty, -1 (8 bytes, signed), empty].
"""

import os
import sys
import threading
import time
from typing import Any

import msgspec
import zmq

ExternalBlockHash = bytes | int


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


def engine_hash(i: int) -> bytes:
    # vLLM's block hashes are opaque 32-byte digests; any distinct bytes will do.
    return bytes([i]) * 32


def main() -> None:
    port = int(sys.argv[1])
    tokens = [int(t) for t in sys.argv[2].split(",")]
    bs = 16
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    print("bound", flush=True)
    sub = pub.recv()  # the subscriber's subscription (b"\x01" + topic)
    assert sub[:1] == b"\x01", sub
    enc = msgspec.msgpack.Encoder()
    seq = 0
    buffer: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def make(s: int, *events: Any) -> bytes:
        batch = KVEventBatch(ts=time.time(), events=list(events), data_parallel_rank=0)
        payload = enc.encode(batch)
        with lock:
            buffer.append((s, payload))
        return payload

    def send(s: int, *events: Any) -> None:
        pub.send_multipart((b"", s.to_bytes(8, "big"), make(s, *events)))

    def lose(s: int, *events: Any) -> None:
        make(s, *events)

    if len(sys.argv) > 3:
        replay = ctx.socket(zmq.ROUTER)
        replay.bind(f"tcp://127.0.0.1:{int(sys.argv[3])}")

        def serve_replays() -> None:
            while True:
                frames = replay.recv_multipart()
                if len(frames) != 3:
                    continue
                client, _, start = frames
                start_seq = int.from_bytes(start, "big")
                with lock:
                    batches = [b for b in buffer if b[0] >= start_seq]
                for s, payload in batches:
                    replay.send_multipart((client, b"", s.to_bytes(8, "big"), payload))
                replay.send_multipart((client, b"", (-1).to_bytes(8, "big", signed=True), b""))

        threading.Thread(target=serve_replays, daemon=True).start()

    def stored(first: int, n: int, parent: int | None) -> BlockStored:
        return BlockStored(
            block_hashes=[engine_hash(first + k) for k in range(n)],
            parent_block_hash=None if parent is None else engine_hash(parent),
            token_ids=tokens[first * bs : (first + n) * bs],
            block_size=bs,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )

    steps = [
        lambda: [send(0, stored(0, 2, None)), send(1, stored(2, 1, 1))],
        lambda: [send(2, BlockRemoved(block_hashes=[engine_hash(2)], medium="GPU"))],
        lambda: [
            lose(3, stored(2, 1, 1)),
            lose(4, BlockRemoved(block_hashes=[engine_hash(0)], medium="GPU")),
            send(5, stored(0, 1, None)),
        ],
    ]
    for step in steps:
        line = sys.stdin.readline()
        if line.strip() != "next":
            break
        sent = step()
        seq += len(sent)
        print(f"published {seq}", flush=True)
    # Serve replays until the test closes stdin.
    sys.stdin.read()
    pub.close(linger=1000)
    # The replay thread blocks in recv on its socket, which would keep ctx.term() waiting.
    sys.stdout.flush()
    os._exit(0)


main()
