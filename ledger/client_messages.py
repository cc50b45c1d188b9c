"""Which message answers which CLIENT_* request: Sawtooth 1.2's naming, as one rule.

The request type CLIENT_<WHAT>_REQUEST carries a Client<What>Request and is answered by
CLIENT_<WHAT>_RESPONSE carrying a Client<What>Response; the one exception, the block getters
CLIENT_BLOCK_GET_BY_{ID,NUM,BATCH_ID,TRANSACTION_ID}_REQUEST, share CLIENT_BLOCK_GET_RESPONSE.
The REST API and the dev validator's client queries both pair requests with answers through
here, instead of each spelling the pairs out (tests/test_client_queries.py does, to check it).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from . import protos as pb

_TYPES = pb.Message.MessageType


class ClientExchange(NamedTuple):
    request_type: int
    request_cls: type
    response_type: int
    response_cls: type


def _message_class(type_name: str) -> type:
    # CLIENT_BLOCK_GET_BY_ID_REQUEST -> ClientBlockGetByIdRequest
    return getattr(pb, "".join(word.title() for word in type_name.split("_")))


@functools.cache
def exchange(request_type: int) -> ClientExchange:
    """The request and response of a CLIENT_*_REQUEST message type."""
    name = _TYPES.Name(request_type)
    answer = re.sub(r"(_BY_\w+)?_REQUEST$", "_RESPONSE", name)
    return ClientExchange(request_type, _message_class(name), _TYPES.Value(answer), _message_class(answer))


@functools.cache
def exchange_of(request_cls: type) -> ClientExchange:
    """The same, from the request's message class (ClientBlockGetByIdRequest)."""
    return exchange(_TYPES.Value(re.sub(r"(?<!^)(?=[A-Z])", "_", request_cls.__name__).upper()))
