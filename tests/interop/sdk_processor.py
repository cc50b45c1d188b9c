"""A transaction processor written against the REFERENCE sawtooth-sdk 1.2.5 API.

Runs under CPython 3.8 with sawtooth-sdk 1.2.5 and protobuf 3.20 (.venv-sdk38), so the dev
validator is checked against processor code we did not write. Family "sdkcounter" 1.0: the payload
is a decimal integer added to the counter stored at NAMESPACE + 64 zeros; a negative total is
invalid. It also adds an event and receipt data, and uses header_bytes with the RAW header
style when asked to (argv[2] == "raw").
"""

import hashlib
import sys

from sawtooth_sdk.processor.core import TransactionProcessor
from sawtooth_sdk.processor.exceptions import InvalidTransaction
from sawtooth_sdk.processor.handler import TransactionHandler
from sawtooth_sdk.protobuf.processor_pb2 import TpRegisterRequest

NAMESPACE = hashlib.sha512(b"sdkcounter").hexdigest()[:6]
ADDRESS = NAMESPACE + "0" * 64


class CounterHandler(TransactionHandler):
    family_name = "sdkcounter"
    family_versions = ["1.0"]
    namespaces = [NAMESPACE]

    def apply(self, transaction, context):
        try:
            delta = int(transaction.payload.decode())
        except ValueError:
            raise InvalidTransaction("payload is not a decimal integer")
        entries = context.get_state([ADDRESS])
        current = int(entries[0].data.decode()) if entries and entries[0].data else 0
        total = current + delta
        if total < 0:
            raise InvalidTransaction("counter would go negative: {}".format(total))
        context.set_state({ADDRESS: str(total).encode()})
        context.add_event("sdkcounter/updated", [("total", str(total))])
        context.add_receipt_data(b"counted")


if __name__ == "__main__":
    processor = TransactionProcessor(url=sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "raw":
        processor.set_header_style(TpRegisterRequest.RAW)
    processor.add_handler(CounterHandler())
    try:
        processor.start()
    except KeyboardInterrupt:
        pass
    finally:
        processor.stop()
