"""The handshake's option bodies and option reply payloads, declared with construct.

Off the hot path: these are parsed and built a few times per connection, never per request
(transmission uses the precompiled structs in `wire`). Each declaration is the layout the
spec gives (protocol/spec.md section 3), used both ways: the server parses requests and
builds replies with them, the client builds requests and parses replies.

Declarations are compiled once at import (construct generates Python for them): 2-5x faster
than interpreted. A compiled parser is less strict about input cut short, so the server
checks lengths before it parses, and reads queries with the interpreted STRING.

The server's error answers depend on *which* rule a malformed body breaks first (spec 3.4 and
3.6 name them), so requests are parsed field by field from one stream, in wire order, and the
caller turns construct's complaint at each step into that rule's answer.
"""

from __future__ import annotations

import struct

from construct import (
    ConstructError,
    GreedyBytes,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    PrefixedArray,
    Struct,
    Terminated,
)

#: What parsing a malformed body raises: compiled parsers raise struct's error where the
#: interpreted ones raise construct's.
ParseError = (ConstructError, struct.error)

#: A u32 length-prefixed string (export names, metadata context queries). Not compiled:
#: the server reads untrusted queries with it one by one, and only the interpreted form
#: refuses a string cut short (the compiled one returns what there is).
STRING = Prefixed(Int32ub, GreedyBytes)
#: The same, compiled, for a string whose length the caller has checked against the data.
CHECKED_STRING = Prefixed(Int32ub, GreedyBytes).compile()
#: A u32 (a length or count looked at before the parse that relies on it).
U32 = Int32ub.compile()

#: NBD_OPT_INFO / NBD_OPT_GO data: the export name, then the information types wanted.
INFO_REQUEST = Struct(
    "name" / STRING,
    "infos" / PrefixedArray(Int16ub, Int16ub),
    Terminated,
).compile()

#: NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: export name, then queries.
META_CONTEXT_REQUEST = Struct(
    "name" / STRING,
    "queries" / PrefixedArray(Int32ub, STRING),
    Terminated,
).compile()
#: The request's parts, read one at a time by the server (see the module docstring).
QUERY_COUNT = Int32ub.compile()

#: NBD_REP_SERVER (a LIST answer): the name, then the description as the rest.
SERVER_REPLY = Struct("name" / STRING, "description" / GreedyBytes).compile()

#: NBD_REP_META_CONTEXT: the context id, then its name as the rest.
META_CONTEXT_REPLY = Struct("id" / Int32ub, "name" / GreedyBytes).compile()

#: NBD_REP_INFO payloads: a u16 information type first, then by type:
INFO_TYPE = Int16ub.compile()
INFO_EXPORT = Struct("type" / Int16ub, "size" / Int64ub, "flags" / Int16ub, Terminated).compile()
INFO_BLOCK_SIZE = Struct(
    "type" / Int16ub,
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
    Terminated,
).compile()
#: NBD_INFO_NAME and NBD_INFO_DESCRIPTION: text as the rest.
INFO_TEXT = Struct("type" / Int16ub, "text" / GreedyBytes).compile()

__all__ = [
    "CHECKED_STRING",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "INFO_REQUEST",
    "INFO_TEXT",
    "INFO_TYPE",
    "META_CONTEXT_REPLY",
    "META_CONTEXT_REQUEST",
    "QUERY_COUNT",
    "SERVER_REPLY",
    "STRING",
    "U32",
    "ParseError",
]
