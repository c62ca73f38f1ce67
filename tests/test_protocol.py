"""The wire format and handshake, driven directly: no sockets."""

import os
import struct

import pytest

from clusterexec import protocol as P


def feed_in_pieces(reader: P.FrameReader, data: bytes, size: int) -> list[P.Message]:
    out = []
    for i in range(0, len(data), size):
        out.extend(reader.feed(data[i : i + size]))
    return out


@pytest.mark.parametrize("piece", [1, 3, 7, 1000, 1 << 20])
def test_frames_survive_any_split_of_the_stream(piece):
    frames = [
        P.encode_bytes({"t": "a", "n": 1}),
        P.encode_bytes({"t": "b"}, [b"x" * 100, b"", os.urandom(5000)]),
        P.encode_bytes({"t": "c", "nested": {"k": [1, 2]}}, [b"tail"]),
    ]
    messages = feed_in_pieces(P.FrameReader(), b"".join(frames), piece)
    assert [m.type for m in messages] == ["a", "b", "c"]
    assert [bytes(b) for b in messages[1].buffers][:2] == [b"x" * 100, b""]
    assert len(messages[1].buffers[2]) == 5000
    assert messages[2].header["nested"] == {"k": [1, 2]}
    assert bytes(messages[2].buffers[0]) == b"tail"


def read_into_reader(reader: P.FrameReader, stream: bytes, most: int, pos: int = 0) -> list[P.Message]:
    """As the connections read a socket: at most `most` bytes at a time, into the buffer the reader offers."""
    out = []
    while pos < len(stream):
        buf = reader.get_buffer()
        n = min(len(buf), most, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        out.extend(reader.filled(n))
    return out


@pytest.mark.parametrize("piece", [1000, 65536, 3 << 20])
@pytest.mark.parametrize("take", [feed_in_pieces, read_into_reader], ids=["fed", "read into its buffer"])
def test_a_large_frame_between_small_ones_arrives_whole_however_the_stream_is_cut(piece, take):
    big, middling = os.urandom(3 << 20), os.urandom(300_000)  # more than a read's scratch, less than large
    stream = b"".join([
        P.encode_bytes({"t": "small", "i": 1}, [b"a"]),
        P.encode_bytes({"t": "big"}, [b"head", big, b"tail"]),
        P.encode_bytes({"t": "small", "i": 2}, [middling]),
        P.encode_bytes({"t": "small", "i": 3}),
    ])
    reader = P.FrameReader()
    messages = take(reader, stream, piece)
    assert [m.type for m in messages] == ["small", "big", "small", "small"]
    assert [bytes(b) for b in messages[1].buffers] == [b"head", big, b"tail"]
    assert messages[2].buffers == [middling] and messages[3].header["i"] == 3
    assert reader.buffered == 0


def test_a_large_frame_is_read_straight_into_the_memory_its_buffers_then_view():
    big = os.urandom(5 << 20)
    frame = P.encode_bytes({"t": "big"}, [big])
    reader = P.FrameReader()
    assert read_into_reader(reader, frame[:100_000], 100_000) == []
    rest = reader.get_buffer()
    assert len(rest) == len(frame) - 100_000  # one read can finish the frame
    rest[:] = frame[100_000:]
    (message,) = reader.filled(len(rest))
    assert message.buffers[0].obj is rest.obj  # a view of what the socket filled: not copied again
    assert message.buffers[0] == big


def test_readers_sharing_a_scratch_buffer_in_turns_each_get_their_own_frames():
    scratch = memoryview(bytearray(P.FrameReader.SCRATCH))
    a, b = P.FrameReader(scratch=scratch), P.FrameReader(scratch=scratch)
    stream_a = b"".join(P.encode_bytes({"t": "a", "i": i}, [os.urandom(i * 1000)]) for i in range(20))
    stream_b = b"".join(P.encode_bytes({"t": "b", "i": i}, [bytes([i]) * 7000]) for i in range(20))
    got: dict[str, list[P.Message]] = {"a": [], "b": []}
    for i in range(0, max(len(stream_a), len(stream_b)), 4000):
        for name, reader, stream in (("a", a, stream_a), ("b", b, stream_b)):
            got[name] += read_into_reader(reader, stream[: i + 4000], 4000, pos=min(i, len(stream)))
    assert got["a"] == feed_in_pieces(P.FrameReader(), stream_a, 4000)
    assert [bytes(m.buffers[0]) for m in got["b"]] == [bytes([i]) * 7000 for i in range(20)]


def test_oversized_length_prefix_is_rejected_before_reading_the_body():
    reader = P.FrameReader(max_frame=1024)
    prefix = struct.pack("!HI", 1, 10) + struct.pack("!Q", 1 << 40)
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        reader.feed(prefix)


def test_oversized_header_is_rejected():
    with pytest.raises(P.ProtocolError, match="header"):
        P.FrameReader(max_header=100).feed(struct.pack("!HI", 0, 10_000))


@pytest.mark.parametrize("header", [b"not json", b"[1, 2]", b'{"no_type": 1}', b'{"t": 5}', b"\xff\xfe"])
def test_header_that_is_not_a_typed_json_object_is_rejected(header):
    frame = struct.pack("!HI", 0, len(header)) + header
    with pytest.raises(P.ProtocolError):
        P.FrameReader().feed(frame)


def test_handshake_accepts_the_shared_key_both_ways():
    key = b"secret"
    server_challenge, client_challenge = P.new_challenge(), P.new_challenge()
    proof = P.client_proof(key, P.server_hello(server_challenge), client_challenge)
    verdict = P.server_check(key, server_challenge, proof)
    assert verdict.startswith(P.VERDICT_OK)
    P.client_check(key, client_challenge, verdict)


def test_handshake_with_a_wrong_key_is_refused_with_a_clear_error():
    server_challenge, client_challenge = P.new_challenge(), P.new_challenge()
    proof = P.client_proof(b"wrong", P.server_hello(server_challenge), client_challenge)
    verdict = P.server_check(b"right", server_challenge, proof)
    assert verdict.startswith(P.VERDICT_WRONG_KEY)
    with pytest.raises(P.AuthenticationError, match="rejected our authentication key"):
        P.client_check(b"wrong", client_challenge, verdict)


def test_a_server_that_does_not_know_the_key_cannot_impersonate_the_master():
    server_challenge, client_challenge = P.new_challenge(), P.new_challenge()
    P.client_proof(b"key", P.server_hello(server_challenge), client_challenge)
    forged = P.VERDICT_OK + os.urandom(P.DIGEST_SIZE)
    with pytest.raises(P.AuthenticationError, match="could not prove"):
        P.client_check(b"key", client_challenge, forged)


def test_a_replayed_proof_fails_against_a_new_challenge():
    key = b"k"
    first = P.new_challenge()
    proof = P.client_proof(key, P.server_hello(first), P.new_challenge())
    assert P.server_check(key, P.new_challenge(), proof).startswith(P.VERDICT_WRONG_KEY)


def test_version_mismatch_is_named_on_both_sides():
    hello = P.SERVER_HELLO.pack(P.MAGIC, P.PROTOCOL_VERSION + 1, P.new_challenge())
    with pytest.raises(P.VersionMismatch, match="protocol"):
        P.client_proof(b"k", hello, P.new_challenge())
    challenge = P.new_challenge()
    old_proof = P.CLIENT_PROOF.pack(P.MAGIC, P.PROTOCOL_VERSION + 1, bytes(32), P.new_challenge())
    verdict = P.server_check(b"k", challenge, old_proof)
    with pytest.raises(P.VersionMismatch):
        P.client_check(b"k", P.new_challenge(), verdict)


def test_not_a_clusterexec_server_is_named():
    with pytest.raises(P.ProtocolError, match="not a clusterexec master"):
        P.client_proof(b"k", b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(10), P.new_challenge())


def blob(data: bytes) -> P.Blob:
    return P.Blob(P.blob_hash(data), data)


def relay(tasks, sender_lru, receiver_lru):
    entries, buffers = P.encode_tasks(((t.id, t) for t in tasks), sender_lru)
    frame = P.encode_bytes({"t": "tasks", "tasks": entries}, buffers)
    (message,) = P.FrameReader().feed(frame)
    return P.decode_tasks(message.header["tasks"], message.buffers, receiver_lru), buffers


def test_a_function_blob_crosses_a_connection_once():
    fn = blob(b"function" * 1000)
    sender, receiver = P.BlobLRU(), P.BlobLRU()
    first, buffers1 = relay([P.Task(1, [fn], [b"a"]), P.Task(2, [fn], [b"b"])], sender, receiver)
    second, buffers2 = relay([P.Task(3, [fn], [b"c"])], sender, receiver)
    assert sum(len(b) for b in buffers1) == len(fn.data) + 2
    assert sum(len(b) for b in buffers2) == 1
    for task in [*first, *second]:
        assert bytes(task.deps[0].data) == fn.data
    assert [bytes(t.bufs[0]) for t in first + second] == [b"a", b"b", b"c"]


def test_mirrored_caches_evict_the_same_blobs_and_resend_them():
    sender, receiver = P.BlobLRU(max_items=2), P.BlobLRU(max_items=2)
    blobs = [blob(bytes([i]) * 10) for i in range(3)]
    sequence = [0, 1, 2, 0, 1, 1, 2, 0]
    for i, which in enumerate(sequence):
        (task,), _ = relay([P.Task(i, [blobs[which]], [])], sender, receiver)
        assert bytes(task.deps[0].data) == blobs[which].data
        assert list(sender._items) == list(receiver._items)


def test_a_task_referring_to_an_unknown_blob_is_a_protocol_error():
    entries = [[1, ["0" * 32], [0], 0, None]]
    with pytest.raises(P.ProtocolError, match="never sent"):
        P.decode_tasks(entries, [], P.BlobLRU())


def test_a_verifying_reader_refuses_a_blob_sent_under_another_blobs_hash_and_caches_nothing_of_it():
    honest, forged = b"the function everyone uses", b"other code"
    cache = P.BlobLRU()
    with pytest.raises(P.ProtocolError, match="does not match its hash"):
        P.decode_tasks([[1, [P.blob_hash(honest)], [1], 0, None]], [memoryview(forged)], cache, verify=True)
    assert P.blob_hash(honest) not in cache
    tasks = P.decode_tasks([[1, [P.blob_hash(honest)], [1], 0, None]], [memoryview(honest)], cache, verify=True)
    assert bytes(tasks[0].deps[0].data) == honest


def test_nesting_deeper_than_the_json_parser_recurses_is_a_protocol_error():
    head = b'{"t":"x","y":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(P.ProtocolError, match="nested too deep"):
        P.FrameReader().feed(struct.pack("!HI", 0, len(head)) + head)


@pytest.mark.parametrize("entries,nbufs", [
    ([[1, [], [], 5, None]], 1),   # claims more buffers than present
    ([[1, [], [], 0, None]], 1),   # leaves a buffer unclaimed
    ([[1, [], []]], 0),            # too short
    ([["x", [], [], 0, None]], 0),  # id not a number
])
def test_malformed_task_entries_are_protocol_errors(entries, nbufs):
    with pytest.raises(P.ProtocolError):
        P.decode_tasks(entries, [memoryview(b"x")] * nbufs, P.BlobLRU())


def test_a_peer_claiming_a_huge_frame_does_not_make_the_reader_reserve_it():
    reader = P.FrameReader()
    claim = struct.pack("!HI", 1, 2) + struct.pack("!Q", 3 << 30) + b"{}"
    reader.feed(claim + b"x" * 100_000)
    assert reader._frame is None and reader.buffered < 200_000


# ---------------------------------------------------------------------------------------------- message table


def test_every_declared_message_with_its_fields_passes_the_check():
    samples = {int: 1, float: 1.5, str: "x", list: [], dict: {}, bool: True}
    for (sender, kind), fields in P.MESSAGES.items():
        header = {"t": kind}
        for name, types in fields.items():
            first = types[0] if isinstance(types, tuple) else types
            header[name.rstrip("?")] = samples[first]
        assert P.check_message(sender, header) == kind


def test_a_message_missing_a_field_or_with_a_field_of_the_wrong_type_is_a_protocol_error():
    with pytest.raises(P.ProtocolError, match="without its field 'ids'"):
        P.check_message("client", {"t": "kill"})
    with pytest.raises(P.ProtocolError, match="'req' has the wrong type"):
        P.check_message("client", {"t": "cancel", "req": "1", "ids": []})
    with pytest.raises(P.ProtocolError, match="'n' has the wrong type"):
        P.check_message("client", {"t": "got", "n": True})  # (a bool is no count)


def test_a_message_a_peer_of_that_role_never_sends_is_a_protocol_error():
    with pytest.raises(P.ProtocolError, match="unknown message type 'tasks' from a client"):
        P.check_message("client", {"t": "tasks", "tasks": []})  # (only the master hands out tasks)
    with pytest.raises(P.ProtocolError, match="unknown message type None"):
        P.check_message("node", {"ids": []})
    with pytest.raises(P.ProtocolError, match="JSON object"):
        P.check_message("master", ["t", "ping"])


def test_optional_fields_may_be_missing():
    assert P.check_message("node", {"t": "prefetch", "n": 3}) == "prefetch"
    assert P.check_message("master", {"t": "welcome", "id": 1}) == "welcome"
