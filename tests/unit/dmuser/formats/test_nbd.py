"""The NBD wire format: sizes and byte layouts from proto.md, round trips, refusals."""

from __future__ import annotations

import pytest

from dmuser.formats import nbd


def test_greeting_layout() -> None:
    raw = nbd.encode_greeting(nbd.HandshakeFlag.FIXED_NEWSTYLE | nbd.HandshakeFlag.NO_ZEROES)
    assert raw == b"NBDMAGICIHAVEOPT\x00\x03" and len(raw) == nbd.GREETING_SIZE == 18
    assert nbd.decode_greeting(raw) == 3
    with pytest.raises(nbd.NbdProtocolError, match="not an NBD server"):
        nbd.decode_greeting(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(nbd.NbdProtocolError, match="oldstyle"):
        nbd.decode_greeting(b"NBDMAGIC" + (0x00420281861253).to_bytes(8, "big") + b"\0\0")


def test_option_and_reply_layout() -> None:
    raw = nbd.encode_option(nbd.Opt.GO, nbd.encode_info_request("disk", (nbd.Info.BLOCK_SIZE,)))
    assert raw[:8] == b"IHAVEOPT" and raw[8:12] == b"\0\0\0\x07"
    assert raw[16:] == b"\0\0\0\x04disk\0\x01\0\x03"
    assert nbd.decode_option_header(raw[:16]) == (7, len(raw) - 16)
    assert nbd.decode_info_request(raw[16:]) == ("disk", [3])
    rep = nbd.encode_option_reply(nbd.Opt.GO, nbd.Rep.ERR_UNKNOWN, b"no")
    assert rep[:8] == (0x3E889045565A9).to_bytes(8, "big") and rep[12:16] == b"\x80\0\0\x06"
    assert nbd.decode_option_reply_header(rep[:20]) == (7, nbd.Rep.ERR_UNKNOWN, 2)
    assert nbd.Rep.ERR_UNSUP.is_error and not nbd.Rep.ACK.is_error
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_option_header(b"XHAVEOPT" + bytes(8))
    with pytest.raises(nbd.NbdProtocolError, match="length"):
        nbd.decode_info_request(b"\0\0\0\x01a\0\x02\0\x03")  # says 2 infos, has 1


def test_infos_and_export_name_reply() -> None:
    assert nbd.decode_info(nbd.encode_info_export(1 << 30, 0x1D)) == (0, (1 << 30, 0x1D))
    assert nbd.decode_info(nbd.encode_info_block_size(512, 4096, 1 << 25)) == \
        (3, (512, 4096, 1 << 25))
    assert nbd.decode_info(b"\0\x02hello") == (2, ())
    assert len(nbd.encode_export_name_reply(4096, 1, no_zeroes=False)) == 10 + 124
    assert nbd.decode_export_name_reply(nbd.encode_export_name_reply(4096, 1, True)) == (4096, 1)
    assert nbd.decode_server_entry(nbd.encode_server_entry("vol") + b"desc") == "vol"


def test_request_and_reply_layout() -> None:
    req = nbd.Request(nbd.Cmd.WRITE, 0x1122334455667788, 4096, 512, nbd.CmdFlag.FUA)
    raw = nbd.encode_request(req)
    assert len(raw) == nbd.REQUEST_SIZE == 28
    assert raw[:4] == b"\x25\x60\x95\x13" and raw[4:6] == b"\0\x01" and raw[6:8] == b"\0\x01"
    assert raw[8:16] == bytes.fromhex("1122334455667788")
    assert nbd.decode_request(raw) == req
    rep = nbd.encode_simple_reply(7, nbd.Err.EPERM)
    assert rep == b"\x67\x44\x66\x98\0\0\0\x01" + (7).to_bytes(8, "big")
    assert nbd.decode_simple_reply(rep) == (7, 1)
    with pytest.raises(nbd.NbdProtocolError, match="magic"):
        nbd.decode_simple_reply(b"\x66\x8e\x33\xef" + bytes(12))  # structured: not negotiated
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_request(bytes(20))


@pytest.mark.parametrize("errno_value,expected", [(1, 1), (5, 5), (28, 28), (30, 1),
                                                  (95, 95), (6, 5), (110, 5)])
def test_errors_map_to_the_allowed_set(errno_value: int, expected: int) -> None:
    assert nbd.error_for(errno_value) == expected


def test_structured_reply_chunks() -> None:
    raw = nbd.encode_data_chunk_header(5, 4096, 512)
    assert len(raw) == nbd.CHUNK_HEADER_SIZE + 8
    assert raw[:4] == b"\x66\x8e\x33\xef" and raw[4:6] == b"\0\x01" and raw[6:8] == b"\0\x01"
    assert nbd.decode_chunk_header(raw) == (1, nbd.ReplyType.OFFSET_DATA, 5, 8 + 512)
    assert raw[20:] == (4096).to_bytes(8, "big")
    err = nbd.encode_error_chunk(6, nbd.Err.EIO, "EIO")
    assert nbd.decode_chunk_header(err) == (1, 0x8001, 6, 4 + 2 + 3)
    assert nbd.decode_error_payload(err[20:]) == (5, "EIO")
    assert nbd.decode_chunk_header(nbd.encode_chunk_header(7, nbd.ReplyType.NONE, 0)) == \
        (1, 0, 7, 0)
    with pytest.raises(nbd.NbdProtocolError):
        nbd.decode_chunk_header(nbd.encode_simple_reply(1) + bytes(4))
