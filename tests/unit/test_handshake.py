"""ServerHandshake, option by option, through the in-memory pair and as raw bytes."""

from __future__ import annotations

import itertools

import pytest

from blockvirt.nbd import wire
from blockvirt.nbd.connection import ServerConnection
from blockvirt.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    NBDMAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from blockvirt.nbd.events import Aborted, AccessDenied, ExportInfo, Negotiated, OptionRefused, StartTLS
from blockvirt.nbd.exceptions import LocalProtocolError, RemoteProtocolError
from blockvirt.nbd.handshake import (
    _TRANSITIONS,
    CONTEXT_IDS,
    MAX_LISTS,
    MAX_META_QUERIES,
    MAX_OPTIONS,
    Input,
    ServerHandshake,
    State,
    StateMachine,
    TLSMode,
    transmission_flags,
)
from tests.helpers import (
    FakeCatalog,
    NbdPair,
    default_catalog,
    option_payload_info,
    option_payload_meta,
    parse_option_replies,
)

TF = TransmissionFlag
CLIENT_FLAGS = wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)


def raw_server(
    catalog: FakeCatalog | None = None, *, tls: TLSMode = TLSMode.NONE, cflags: bytes = CLIENT_FLAGS
) -> ServerConnection:
    """A server connection past the greeting, driven with raw bytes."""
    conn = ServerConnection(catalog if catalog is not None else default_catalog(), tls=tls)
    conn.data_to_send()  # greeting
    conn.receive_data(cflags)
    assert conn.next_event() is None
    return conn


def send_option(
    conn: ServerConnection, opt: int, data: bytes = b""
) -> tuple[list[object], list[tuple[int, int, bytes]]]:
    conn.receive_data(wire.option(opt, data))
    events: list[object] = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
        if conn.transmission is not None:
            break
    return events, parse_option_replies(conn.data_to_send())


# ---------------------------------------------------------------- greeting and client flags


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    conn = ServerConnection(default_catalog())
    magic, ihave, hflags = wire.GREETING.unpack(conn.data_to_send())
    assert (magic, ihave) == (NBDMAGIC, IHAVEOPT)
    assert hflags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    assert conn.data_to_send() == b""


def test_client_flags_split_across_reads() -> None:
    conn = ServerConnection(default_catalog())
    for b in CLIENT_FLAGS:
        assert conn.handshake.state is State.GREETING
        conn.receive_data(bytes([b]))
        assert conn.next_event() is None
    assert conn.handshake.state is State.OPTIONS
    assert conn.handshake.no_zeroes


@pytest.mark.parametrize("cflags", [1 << 2, 1 << 31, 0xFFFFFFFF, ClientFlag.C_FIXED_NEWSTYLE | 0x100])
def test_unknown_client_flags_are_a_violation(cflags: int) -> None:
    conn = ServerConnection(default_catalog())
    conn.receive_data(wire.CLIENT_FLAGS.pack(cflags))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.handshake.state is State.CLOSED


def test_bad_option_magic_is_a_violation() -> None:
    conn = raw_server()
    conn.receive_data(wire.OPTION.pack(IHAVEOPT ^ 1, Opt.LIST, 0))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.handshake.state is State.CLOSED


def test_option_longer_than_limit_is_refused_before_its_payload_arrives() -> None:
    conn = raw_server()
    conn.receive_data(wire.OPTION.pack(IHAVEOPT, Opt.GO, MAX_OPTION_LENGTH + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        conn.next_event()
    assert conn.handshake.state is State.CLOSED


def test_option_at_the_limit_is_still_parsed() -> None:
    conn = raw_server()
    events, replies = send_option(conn, 0x7654321, bytes(MAX_OPTION_LENGTH))
    assert [r[1] for r in replies] == [Rep.ERR_UNSUP]
    assert isinstance(events[0], OptionRefused)


def test_option_split_at_every_byte() -> None:
    conn = raw_server()
    data = wire.option(Opt.GO, option_payload_info("disk", [Info.NAME]))
    for i, b in enumerate(data):
        conn.receive_data(bytes([b]))
        ev = conn.next_event()
        if i < len(data) - 1:
            assert ev is None
            assert conn.data_to_send() == b""
    assert isinstance(ev, Negotiated)
    assert ev.export.name == "disk"


# ---------------------------------------------------------------- GO / INFO


def test_go_replies_export_name_description_block_size_then_ack() -> None:
    conn = raw_server()
    payload = option_payload_info("disk", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])
    events, replies = send_option(conn, Opt.GO, payload)
    assert all(opt == Opt.GO for opt, _, _ in replies)
    assert [rep for _, rep, _ in replies] == [Rep.INFO] * 4 + [Rep.ACK]
    infos = {wire.U16.unpack_from(p)[0]: p for _, rep, p in replies if rep == Rep.INFO}
    _, size, flags = wire.INFO_EXPORT.unpack(infos[Info.EXPORT])
    assert size == 1 << 20
    assert infos[Info.NAME][2:] == b"disk"
    assert infos[Info.DESCRIPTION][2:] == b"a test disk"
    assert wire.INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE])[1:] == (1, 4096, 32 * 1024 * 1024)
    assert replies[-1][2] == b""
    [ev] = events
    assert isinstance(ev, Negotiated)
    assert ev.transmission_flags == flags
    assert not ev.structured and ev.contexts == {}
    assert conn.handshake.state is State.TRANSMISSION
    assert conn.transmission is not None


def test_go_without_info_requests_still_sends_export_and_block_size() -> None:
    conn = raw_server()
    _, replies = send_option(conn, Opt.GO, option_payload_info("disk"))
    kinds = [wire.U16.unpack_from(p)[0] for _, rep, p in replies if rep == Rep.INFO]
    assert kinds == [Info.EXPORT, Info.BLOCK_SIZE]
    assert replies[-1][1] == Rep.ACK


def test_go_omits_empty_description_and_ignores_unknown_info_types() -> None:
    conn = raw_server()
    _, replies = send_option(conn, Opt.GO, option_payload_info("ro", [Info.DESCRIPTION, 999]))
    kinds = [wire.U16.unpack_from(p)[0] for _, rep, p in replies if rep == Rep.INFO]
    assert Info.DESCRIPTION not in kinds and 999 not in kinds
    assert replies[-1][1] == Rep.ACK


def test_go_through_client_codec() -> None:
    pair = NbdPair()
    events, res = pair.go("disk")
    assert res.reply == Rep.ACK
    assert res.export is not None
    assert (res.export.name, res.export.size, res.export.description) == ("disk", 1 << 20, "a test disk")
    assert (res.export.min_block, res.export.pref_block, res.export.max_block) == (1, 4096, 32 << 20)
    assert isinstance(events[0], Negotiated)
    assert res.transmission_flags == events[0].transmission_flags


def test_info_does_not_end_negotiation_and_matches_go() -> None:
    pair = NbdPair()
    events, info = pair.go("disk", info=True)
    assert events == []
    assert info.reply == Rep.ACK
    assert pair.server.handshake.state is State.OPTIONS
    events, go = pair.go("disk")
    assert isinstance(events[0], Negotiated)
    assert (info.export, info.transmission_flags) == (go.export, go.transmission_flags)


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_unknown_export_gets_err_unknown_and_haggling_continues(opt: Opt) -> None:
    pair = NbdPair()
    events, res = pair.option(opt, option_payload_info("nope"))
    assert res.reply == Rep.ERR_UNKNOWN
    assert "nope" in res.message
    assert isinstance(events[0], OptionRefused) and events[0].reply == Rep.ERR_UNKNOWN
    assert pair.server.handshake.state is State.OPTIONS
    events, res = pair.go("disk")
    assert res.reply == Rep.ACK and isinstance(events[0], Negotiated)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0",
        wire.U32.pack(100) + b"disk" + wire.U16.pack(0),  # name longer than option
        wire.U32.pack(4) + b"disk" + wire.U16.pack(2) + wire.U16.pack(1),  # count mismatch
        wire.U32.pack(4) + b"disk" + wire.U16.pack(0) + b"x",  # trailing byte
        wire.U32.pack(2) + b"\xff\xfe" + wire.U16.pack(0),  # not UTF-8
        wire.U32.pack(3) + b"d\0k" + wire.U16.pack(0),  # NUL in name
    ],
)
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_malformed_info_payload_gets_err_invalid(opt: Opt, payload: bytes) -> None:
    conn = raw_server()
    events, replies = send_option(conn, opt, payload)
    assert [(o, r) for o, r, _ in replies] == [(opt, Rep.ERR_INVALID)]
    assert isinstance(events[0], OptionRefused)
    assert conn.handshake.state is State.OPTIONS


def test_empty_name_looks_up_the_default_export() -> None:
    cat = FakeCatalog(ExportInfo("", 512))
    pair = NbdPair(cat)
    events, res = pair.go("")
    assert res.reply == Rep.ACK and isinstance(events[0], Negotiated)
    assert cat.lookups == [""]


# ---------------------------------------------------------------- LIST / ABORT / unknown


def test_denied_export_is_hidden_and_answered_as_unknown() -> None:
    """The catalog says 'secret' exists but this client may not open it (spec §3.7): the
    client gets what a name that does not exist gets; the event tells the server why."""
    pair = NbdPair()
    _, res = pair.option(Opt.LIST)
    assert "secret" not in [n for n, _ in res.exports]
    for info in (True, False):
        events, res = pair.go("secret", info=info)
        assert res.reply == Rep.ERR_UNKNOWN and res.message == "no export named 'secret' for this client"
        assert events == [AccessDenied(Opt.INFO if info else Opt.GO, "secret", "denied by the test catalog")]
    pair.option(Opt.STRUCTURED_REPLY)
    for list_only in (True, False):
        events, res = pair.meta("secret", [BASE_ALLOCATION], list_only=list_only)
        assert res.reply == Rep.ERR_UNKNOWN and res.contexts == ()
        assert len(events) == 1 and isinstance(events[0], AccessDenied) and not events[0].closed
    # Haggling goes on: an open export still works, with no context left from the refusal.
    neg = pair.negotiate("disk", contexts=())
    assert neg.export.name == "disk" and neg.contexts == {}


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_denied_and_unknown_are_the_same_bytes(opt: Opt) -> None:
    """A denied client cannot tell a name it may not open from one that does not exist."""
    catalog = FakeCatalog(ExportInfo("secret", 4096), denied=("secret",))
    answers = []
    for name in ("secret", "nosuch"):
        conn = raw_server(catalog)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            send_option(conn, Opt.STRUCTURED_REPLY)
            payload = option_payload_meta(name, [BASE_ALLOCATION])
        else:
            payload = option_payload_info(name, [Info.NAME])
        _, replies = send_option(conn, opt, payload)
        answers.append([(r, p.replace(name.encode(), b"NAME")) for _, r, p in replies])
    assert answers[0] == answers[1]
    assert answers[0][0][0] == Rep.ERR_UNKNOWN


def test_export_name_of_a_denied_export_closes() -> None:
    conn = raw_server()
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"secret"))
    ev = conn.next_event()
    assert ev == AccessDenied(Opt.EXPORT_NAME, "secret", "denied by the test catalog", closed=True)
    assert conn.data_to_send() == b"" and conn.handshake.state is State.CLOSED


def test_list_returns_every_export_then_ack() -> None:
    pair = NbdPair()
    events, res = pair.option(Opt.LIST)
    assert events == []
    assert res.reply == Rep.ACK
    assert res.exports == (("disk", "a test disk"), ("ro", ""), ("plain", ""))


def test_list_with_no_exports_is_just_ack() -> None:
    conn = raw_server(FakeCatalog())
    _, replies = send_option(conn, Opt.LIST)
    assert [(o, r, p) for o, r, p in replies] == [(Opt.LIST, Rep.ACK, b"")]


def test_list_with_payload_is_invalid() -> None:
    conn = raw_server()
    events, replies = send_option(conn, Opt.LIST, b"x")
    assert [r for _, r, _ in replies] == [Rep.ERR_INVALID]
    assert isinstance(events[0], OptionRefused)


def test_abort_acks_and_closes() -> None:
    conn = raw_server()
    events, replies = send_option(conn, Opt.ABORT, b"ignored data")
    assert [(o, r) for o, r, _ in replies] == [(Opt.ABORT, Rep.ACK)]
    assert isinstance(events[0], Aborted)
    assert conn.handshake.state is State.CLOSED
    conn.receive_data(wire.option(Opt.LIST))
    assert conn.next_event() is None
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("opt", [Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 0, 12, 0x7654321, 0xFFFFFFFF])
def test_unknown_option_gets_err_unsup_and_haggling_continues(opt: int) -> None:
    conn = raw_server()
    events, replies = send_option(conn, opt, b"\x01\x02\x03\x04")
    assert [(o, r) for o, r, _ in replies] == [(opt, Rep.ERR_UNSUP)]
    assert isinstance(events[0], OptionRefused) and events[0].option == opt
    events, replies = send_option(conn, Opt.GO, option_payload_info("disk"))
    assert isinstance(events[0], Negotiated)


def test_several_options_in_one_read() -> None:
    conn = raw_server()
    conn.receive_data(
        wire.option(Opt.STRUCTURED_REPLY)
        + wire.option(99)
        + wire.option(Opt.LIST)
        + wire.option(Opt.GO, option_payload_info("disk"))
    )
    events = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
        if isinstance(ev, Negotiated):
            break
    assert [type(e) for e in events] == [OptionRefused, Negotiated]
    assert events[-1].structured  # type: ignore[union-attr]
    replies = parse_option_replies(conn.data_to_send())
    assert [o for o, _, _ in replies][:2] == [Opt.STRUCTURED_REPLY, 99]
    assert replies[-1] == (Opt.GO, Rep.ACK, b"")


# ---------------------------------------------------------------- floods


def test_more_than_max_options_is_a_violation() -> None:
    conn = raw_server()
    conn.receive_data(wire.option(Opt.STRUCTURED_REPLY) * MAX_OPTIONS)
    assert conn.next_event() is None
    assert len(parse_option_replies(conn.data_to_send())) == MAX_OPTIONS
    conn.receive_data(wire.option(Opt.STRUCTURED_REPLY))
    with pytest.raises(RemoteProtocolError, match="options in one handshake"):
        conn.next_event()
    assert conn.handshake.state is State.CLOSED


def test_more_than_max_lists_is_a_violation() -> None:
    conn = raw_server()
    conn.receive_data(wire.option(Opt.LIST) * (MAX_LISTS + 1))
    with pytest.raises(RemoteProtocolError, match="LIST options"):
        conn.next_event()
    replies = parse_option_replies(conn.data_to_send())
    assert sum(r == Rep.ACK for _, r, _ in replies) == MAX_LISTS


def test_options_per_call_leaves_a_backlog_and_goes_on() -> None:
    conn = ServerConnection(default_catalog(), options_per_call=3)
    conn.data_to_send()
    conn.receive_data(
        CLIENT_FLAGS + wire.option(Opt.LIST) * 7 + wire.option(Opt.GO, option_payload_info("disk"))
    )
    acks = []
    calls = 0
    while True:
        calls += 1
        ev = conn.next_event()
        acks += [r for _, r, _ in parse_option_replies(conn.data_to_send()) if r == Rep.ACK]
        if ev is not None:
            break
        assert conn.handshake.backlog, "None without a backlog: nothing more would be parsed"
    assert isinstance(ev, Negotiated)
    assert calls == 3 and len(acks) == 8  # 3 + 3 + (1 LIST and the GO)
    assert not conn.handshake.backlog


def test_no_backlog_when_waiting_for_data() -> None:
    conn = ServerConnection(default_catalog(), options_per_call=3)
    conn.data_to_send()
    conn.receive_data(CLIENT_FLAGS + wire.option(Opt.LIST) * 3 + wire.option(Opt.LIST)[:5])
    assert conn.next_event() is None and not conn.handshake.backlog
    assert len(parse_option_replies(conn.data_to_send())) == 3 * 4  # 3 exports + ACK, each


# ---------------------------------------------------------------- EXPORT_NAME


def test_export_name_with_no_zeroes() -> None:
    conn = raw_server()
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    ev = conn.next_event()
    assert isinstance(ev, Negotiated)
    out = conn.data_to_send()
    assert len(out) == wire.EXPORT_NAME_REPLY.size
    size, flags = wire.EXPORT_NAME_REPLY.unpack(out)
    assert size == 1 << 20 and flags == ev.transmission_flags
    assert not flags & TF.SEND_DF  # no structured replies negotiated


def test_export_name_without_no_zeroes_pads_124_bytes() -> None:
    conn = raw_server(cflags=wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE))
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(conn.next_event(), Negotiated)
    out = conn.data_to_send()
    assert len(out) == wire.EXPORT_NAME_REPLY.size + 124
    assert out[wire.EXPORT_NAME_REPLY.size :] == bytes(124)


def test_export_name_through_client_codec() -> None:
    pair = NbdPair()
    pair.client.handshake.export_name("disk")
    events = pair.client_to_server()
    pair.server_to_client()
    res = pair.client.next_event()
    assert isinstance(events[0], Negotiated)
    assert res is not None and res.export is not None
    assert res.export.size == 1 << 20
    assert res.transmission_flags == events[0].transmission_flags


def test_export_name_after_structured_reply_advertises_df() -> None:
    conn = raw_server()
    send_option(conn, Opt.STRUCTURED_REPLY)
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    ev = conn.next_event()
    assert isinstance(ev, Negotiated) and ev.structured
    assert ev.transmission_flags & TF.SEND_DF


@pytest.mark.parametrize("name", [b"nope", b"\xff", b"di\0sk"])
def test_export_name_unknown_closes_without_reply(name: bytes) -> None:
    conn = raw_server()
    conn.receive_data(wire.option(Opt.EXPORT_NAME, name))
    ev = conn.next_event()
    assert isinstance(ev, Aborted)
    assert conn.data_to_send() == b""
    assert conn.handshake.state is State.CLOSED
    assert conn.transmission is None


# ---------------------------------------------------------------- STRUCTURED_REPLY


def test_structured_reply_acked_and_repeat_acked() -> None:
    pair = NbdPair()
    for _ in range(2):
        events, res = pair.option(Opt.STRUCTURED_REPLY)
        assert events == [] and res.reply == Rep.ACK
    neg = pair.negotiate("disk", structured=False)
    assert neg.structured
    assert neg.transmission_flags & TF.SEND_DF


def test_structured_reply_with_payload_is_invalid() -> None:
    conn = raw_server()
    _, replies = send_option(conn, Opt.STRUCTURED_REPLY, b"x")
    assert [r for _, r, _ in replies] == [Rep.ERR_INVALID]
    assert not conn.handshake.structured


# ---------------------------------------------------------------- meta contexts


def _sr(pair: NbdPair) -> None:
    _, res = pair.option(Opt.STRUCTURED_REPLY)
    assert res.reply == Rep.ACK


def two_context_catalog() -> FakeCatalog:
    return FakeCatalog(
        ExportInfo("disk", 1 << 20, contexts=(BASE_ALLOCATION, "qemu:allocation-depth")),
        ExportInfo("other", 1 << 20),
    )


@pytest.mark.parametrize("list_only", [True, False])
def test_meta_context_before_structured_reply_is_invalid(list_only: bool) -> None:
    pair = NbdPair()
    events, res = pair.meta("disk", [BASE_ALLOCATION], list_only=list_only)
    assert res.reply == Rep.ERR_INVALID
    assert isinstance(events[0], OptionRefused)


def test_list_meta_context_with_no_queries_lists_all_with_id_zero() -> None:
    pair = NbdPair(two_context_catalog())
    _sr(pair)
    _, res = pair.meta("disk", [], list_only=True)
    assert res.reply == Rep.ACK
    assert res.contexts == ((0, BASE_ALLOCATION), (0, "qemu:allocation-depth"))


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (["base:"], [BASE_ALLOCATION]),
        (["qemu:"], ["qemu:allocation-depth"]),
        ([BASE_ALLOCATION], [BASE_ALLOCATION]),
        (["nope:thing", "x-foo:"], []),
        (["base:unknown"], []),
        (["base:", BASE_ALLOCATION], [BASE_ALLOCATION]),  # no duplicates
    ],
)
def test_list_meta_context_queries(queries: list[str], expected: list[str]) -> None:
    pair = NbdPair(two_context_catalog())
    _sr(pair)
    _, res = pair.meta("disk", queries, list_only=True)
    assert res.reply == Rep.ACK
    assert [name for _, name in res.contexts] == expected


def test_set_meta_context_exact_name_selects_it_for_go() -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.meta("disk", [BASE_ALLOCATION])
    assert res.reply == Rep.ACK
    assert res.contexts == ((CONTEXT_IDS[BASE_ALLOCATION], BASE_ALLOCATION),)
    events, _ = pair.go("disk")
    neg = events[0]
    assert isinstance(neg, Negotiated)
    assert neg.contexts == {CONTEXT_IDS[BASE_ALLOCATION]: BASE_ALLOCATION}


@pytest.mark.parametrize("queries", [["base:"], ["nope:foo"], [], ["base:unknown"]])
def test_set_meta_context_selects_nothing_for(queries: list[str]) -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.meta("disk", queries)
    assert res.reply == Rep.ACK
    assert res.contexts == ()
    events, _ = pair.go("disk")
    assert isinstance(events[0], Negotiated) and events[0].contexts == {}


def test_set_meta_context_ids_are_distinct() -> None:
    pair = NbdPair(two_context_catalog())
    _sr(pair)
    _, res = pair.meta("disk", [BASE_ALLOCATION, "qemu:allocation-depth"])
    ids = [cid for cid, _ in res.contexts]
    assert len(set(ids)) == 2


def test_set_meta_context_for_another_export_than_go_gives_no_contexts() -> None:
    pair = NbdPair(two_context_catalog())
    _sr(pair)
    _, res = pair.meta("other", [BASE_ALLOCATION])
    assert res.reply == Rep.ACK and res.contexts
    events, _ = pair.go("disk")
    assert isinstance(events[0], Negotiated)
    assert events[0].contexts == {}


def test_failed_set_meta_context_clears_previous_selection() -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.meta("disk", [BASE_ALLOCATION])
    assert res.contexts
    _, res = pair.option(Opt.SET_META_CONTEXT, b"\0\0")
    assert res.reply == Rep.ERR_INVALID
    events, _ = pair.go("disk")
    assert events[0].contexts == {}  # type: ignore[union-attr]


def test_later_set_meta_context_replaces_earlier_one() -> None:
    pair = NbdPair()
    _sr(pair)
    pair.meta("disk", [BASE_ALLOCATION])
    pair.meta("disk", [])
    events, _ = pair.go("disk")
    assert events[0].contexts == {}  # type: ignore[union-attr]


def test_set_meta_context_export_without_contexts() -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.meta("plain", [BASE_ALLOCATION])
    assert res.reply == Rep.ACK and res.contexts == ()


@pytest.mark.parametrize("list_only", [True, False])
def test_meta_context_unknown_export(list_only: bool) -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.meta("nope", [BASE_ALLOCATION], list_only=list_only)
    assert res.reply == Rep.ERR_UNKNOWN


_GOOD_META = option_payload_meta("disk", [BASE_ALLOCATION])


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\0\0\0\0\0\0",  # 7 bytes
        wire.U32.pack(50) + b"disk" + wire.U32.pack(0),  # name past the end
        wire.U32.pack(4) + b"disk" + wire.U32.pack(1),  # query count, no query
        wire.U32.pack(4) + b"disk" + wire.U32.pack(1) + wire.U32.pack(20) + b"base:",  # short query
        wire.U32.pack(4) + b"disk" + wire.U32.pack(1) + wire.U32.pack(2),  # missing query body
        _GOOD_META + b"\0",  # trailing bytes
        wire.U32.pack(4) + b"disk" + wire.U32.pack(1) + wire.U32.pack(2) + b"\xff\xfe",  # bad UTF-8
        wire.U32.pack(2) + b"\xc3\x28" + wire.U32.pack(0),  # bad UTF-8 name
    ],
)
@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_malformed_meta_context_payload_is_invalid(opt: Opt, payload: bytes) -> None:
    conn = raw_server()
    send_option(conn, Opt.STRUCTURED_REPLY)
    events, replies = send_option(conn, opt, payload)
    assert [(o, r) for o, r, _ in replies] == [(opt, Rep.ERR_INVALID)]
    assert isinstance(events[0], OptionRefused)
    assert conn.handshake.state is State.OPTIONS


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_too_many_meta_queries_is_too_big(opt: Opt) -> None:
    pair = NbdPair()
    _sr(pair)
    _, res = pair.option(opt, option_payload_meta("disk", ["base:"] * (MAX_META_QUERIES + 1)))
    assert res.reply == Rep.ERR_TOO_BIG
    _, res = pair.option(opt, option_payload_meta("disk", [BASE_ALLOCATION] * MAX_META_QUERIES))
    assert res.reply == Rep.ACK
    assert len(res.contexts) == 1


def test_too_many_queries_declared_without_bodies_is_too_big() -> None:
    conn = raw_server()
    send_option(conn, Opt.STRUCTURED_REPLY)
    payload = wire.U32.pack(4) + b"disk" + wire.U32.pack(2**32 - 1)
    _, replies = send_option(conn, Opt.LIST_META_CONTEXT, payload)
    assert [r for _, r, _ in replies] == [Rep.ERR_TOO_BIG]


# ---------------------------------------------------------------- transmission flags


def test_transmission_flags_full_export_with_structured() -> None:
    flags = transmission_flags(ExportInfo("x", 512), structured=True)
    expected = (
        TF.HAS_FLAGS
        | TF.SEND_FLUSH
        | TF.SEND_FUA
        | TF.SEND_TRIM
        | TF.SEND_WRITE_ZEROES
        | TF.SEND_DF
        | TF.CAN_MULTI_CONN
        | TF.SEND_CACHE
        | TF.SEND_FAST_ZERO
    )
    assert flags == expected


def test_transmission_flags_df_only_with_structured() -> None:
    export = ExportInfo("x", 512)
    assert not transmission_flags(export, structured=False) & TF.SEND_DF
    assert transmission_flags(export, structured=True) & TF.SEND_DF
    assert not transmission_flags(ExportInfo("x", 512, can_df=False), structured=True) & TF.SEND_DF


def test_transmission_flags_read_only_drops_write_flags() -> None:
    flags = transmission_flags(ExportInfo("x", 512, read_only=True), structured=True)
    assert flags & TF.READ_ONLY
    for bit in (TF.SEND_TRIM, TF.SEND_WRITE_ZEROES, TF.SEND_FAST_ZERO):
        assert not flags & bit
    assert flags & TF.HAS_FLAGS


@pytest.mark.parametrize(
    ("field", "bit"),
    [
        ("can_flush", TF.SEND_FLUSH),
        ("can_fua", TF.SEND_FUA),
        ("can_trim", TF.SEND_TRIM),
        ("can_zero", TF.SEND_WRITE_ZEROES),
        ("can_fast_zero", TF.SEND_FAST_ZERO),
        ("can_cache", TF.SEND_CACHE),
        ("can_multi_conn", TF.CAN_MULTI_CONN),
    ],
)
def test_transmission_flag_follows_capability(field: str, bit: TF) -> None:
    assert transmission_flags(ExportInfo("x", 512), structured=True) & bit
    assert not transmission_flags(ExportInfo("x", 512, **{field: False}), structured=True) & bit  # type: ignore[arg-type]


def test_fast_zero_never_without_write_zeroes_and_rotational() -> None:
    flags = transmission_flags(ExportInfo("x", 512, can_zero=False, rotational=True), structured=False)
    assert not flags & TF.SEND_FAST_ZERO
    assert flags & TF.ROTATIONAL


def test_read_only_export_flags_reach_the_client() -> None:
    pair = NbdPair()
    neg = pair.negotiate("ro")
    assert neg.transmission_flags & TF.READ_ONLY
    assert neg.export.read_only


# ---------------------------------------------------------------- TLS


@pytest.mark.parametrize(
    ("opt", "payload"),
    [
        (Opt.LIST, b""),
        (Opt.INFO, option_payload_info("disk")),
        (Opt.GO, option_payload_info("disk")),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST_META_CONTEXT, option_payload_meta("disk", [])),
        (Opt.SET_META_CONTEXT, option_payload_meta("disk", [BASE_ALLOCATION])),
        (0x7654321, b"abcd"),
    ],
)
def test_tls_require_refuses_options_before_starttls(opt: int, payload: bytes) -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    events, replies = send_option(conn, opt, payload)
    assert [(o, r) for o, r, _ in replies] == [(opt, Rep.ERR_TLS_REQD)]
    assert isinstance(events[0], OptionRefused)
    assert conn.handshake.state is State.OPTIONS
    assert not conn.handshake.structured


def test_tls_require_abort_still_acks() -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    events, replies = send_option(conn, Opt.ABORT)
    assert [(o, r) for o, r, _ in replies] == [(Opt.ABORT, Rep.ACK)]
    assert isinstance(events[0], Aborted)


def test_tls_require_export_name_closes() -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    ev = conn.next_event()
    assert isinstance(ev, Aborted) and "TLS" in ev.reason
    assert conn.data_to_send() == b""
    assert conn.handshake.state is State.CLOSED


def test_starttls_acks_then_tls_started_resets_negotiation() -> None:
    conn = raw_server(tls=TLSMode.ALLOW)
    send_option(conn, Opt.STRUCTURED_REPLY)
    send_option(conn, Opt.SET_META_CONTEXT, option_payload_meta("disk", [BASE_ALLOCATION]))
    assert conn.handshake.structured
    events, replies = send_option(conn, Opt.STARTTLS)
    assert [(o, r) for o, r, _ in replies] == [(Opt.STARTTLS, Rep.ACK)]
    assert isinstance(events[0], StartTLS)
    assert conn.handshake.state is State.TLS_PENDING
    # Bytes arriving before the adapter upgraded are not parsed as options.
    conn.receive_data(wire.option(Opt.LIST))
    assert conn.next_event() is None and conn.data_to_send() == b""
    conn.handshake.buffer.skip(len(conn.handshake.buffer))  # the adapter hands them to TLS
    conn.handshake.tls_started()
    assert conn.handshake.state is State.OPTIONS
    assert conn.handshake.tls_active
    assert not conn.handshake.structured
    events, _ = send_option(conn, Opt.GO, option_payload_info("disk"))
    neg = events[0]
    assert isinstance(neg, Negotiated)
    assert not neg.structured and neg.contexts == {}
    assert not neg.transmission_flags & TF.SEND_DF


def test_tls_require_after_starttls_serves_options() -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    events, _ = send_option(conn, Opt.STARTTLS)
    assert isinstance(events[0], StartTLS)
    conn.handshake.tls_started()
    _, replies = send_option(conn, Opt.LIST)
    assert replies[-1][1] == Rep.ACK
    _, replies = send_option(conn, Opt.STRUCTURED_REPLY)
    assert replies == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(conn.next_event(), Negotiated)


def test_starttls_twice_is_invalid() -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    send_option(conn, Opt.STARTTLS)
    conn.handshake.tls_started()
    events, replies = send_option(conn, Opt.STARTTLS)
    assert [r for _, r, _ in replies] == [Rep.ERR_INVALID]
    assert isinstance(events[0], OptionRefused)


def test_starttls_with_payload_is_invalid() -> None:
    conn = raw_server(tls=TLSMode.REQUIRE)
    _, replies = send_option(conn, Opt.STARTTLS, b"x")
    assert [r for _, r, _ in replies] == [Rep.ERR_INVALID]
    assert conn.handshake.state is State.OPTIONS


def test_starttls_without_tls_configured_is_unsupported() -> None:
    conn = raw_server(tls=TLSMode.NONE)
    events, replies = send_option(conn, Opt.STARTTLS)
    assert [r for _, r, _ in replies] == [Rep.ERR_UNSUP]
    assert isinstance(events[0], OptionRefused)


def test_tls_allow_serves_plaintext_options() -> None:
    conn = raw_server(tls=TLSMode.ALLOW)
    events, _ = send_option(conn, Opt.GO, option_payload_info("disk"))
    assert isinstance(events[0], Negotiated)


def test_tls_started_outside_tls_pending_is_a_local_error() -> None:
    conn = raw_server(tls=TLSMode.ALLOW)
    with pytest.raises(LocalProtocolError):
        conn.handshake.tls_started()


# ---------------------------------------------------------------- shutting down


def test_shutting_down_answers_err_shutdown_but_abort_acks() -> None:
    conn = raw_server()
    conn.handshake.shutting_down = True
    _, replies = send_option(conn, Opt.GO, option_payload_info("disk"))
    assert [r for _, r, _ in replies] == [Rep.ERR_SHUTDOWN]
    conn.receive_data(wire.option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(conn.next_event(), Aborted)


# ---------------------------------------------------------------- the state table


@pytest.mark.parametrize(("state", "what"), list(itertools.product(State, Input)))
def test_state_table(state: State, what: Input) -> None:
    m = StateMachine(state)
    target = _TRANSITIONS[state].get(what)
    if target is None:
        with pytest.raises(LocalProtocolError):
            m.fire(what)
        assert m.state is state
    else:
        assert m.fire(what) is target
        assert m.state is target


def test_closed_is_terminal() -> None:
    assert _TRANSITIONS[State.CLOSED] == {}


def test_handshake_after_negotiation_ignores_more_input() -> None:
    hs = ServerHandshake(default_catalog())
    hs.data_to_send()
    hs.receive_data(CLIENT_FLAGS + wire.option(Opt.GO, option_payload_info("disk")) + wire.option(Opt.LIST))
    assert isinstance(hs.next_event(), Negotiated)
    assert hs.next_event() is None
    with pytest.raises(LocalProtocolError):
        hs.machine.fire(Input.OPTION)
    with pytest.raises(LocalProtocolError):
        hs.tls_started()


def test_client_cannot_send_two_options_at_once() -> None:
    pair = NbdPair()
    pair.client.handshake.send_option(Opt.LIST)
    with pytest.raises(LocalProtocolError):
        pair.client.handshake.send_option(Opt.LIST)


# ---------------------------------------------------------------- the option body formats


@pytest.mark.parametrize(
    ("fmt", "value"),
    [
        ("INFO_REQUEST", {"name": b"disk", "infos": [3, 1, 2]}),
        ("META_CONTEXT_REQUEST", {"name": b"disk", "queries": [b"base:allocation", b"qemu:"]}),
        ("SERVER_REPLY", {"name": b"disk", "description": b"a disk"}),
        ("META_CONTEXT_REPLY", {"id": 7, "name": b"base:allocation"}),
        ("INFO_EXPORT", {"type": 0, "size": 1 << 40, "flags": 0x0DED}),
        ("INFO_BLOCK_SIZE", {"type": 3, "minimum": 1, "preferred": 4096, "maximum": 1 << 25}),
    ],
)
def test_option_formats_round_trip_and_match_the_spec_layout(fmt: str, value: dict[str, object]) -> None:
    from blockvirt.nbd import options

    c = getattr(options, fmt)
    raw = c.build(value)
    parsed = c.parse(raw)
    assert {k: parsed[k] for k in value} == value
    if fmt == "INFO_REQUEST":
        assert raw == option_payload_info("disk", [3, 1, 2])  # the layout the tests write by hand
    if fmt == "META_CONTEXT_REQUEST":
        assert raw == option_payload_meta("disk", ["base:allocation", "qemu:"])


def test_option_formats_refuse_bodies_cut_short() -> None:
    """The server relies on this: a string or a count that runs past the data is an error."""
    import io

    from blockvirt.nbd import options

    with pytest.raises(options.ParseError):
        options.STRING.parse_stream(io.BytesIO(wire.U32.pack(20) + b"base:"))
    with pytest.raises(options.ParseError):
        options.INFO_REQUEST.parse(option_payload_info("disk", [1, 2])[:-1])
    with pytest.raises(options.ParseError):
        options.INFO_REQUEST.parse(option_payload_info("disk", [1]) + b"x")
