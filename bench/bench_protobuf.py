"""Protobuf runtimes side by side: our upb-loaded Sawtooth messages vs protobuf 3.20 pure Python.

The 3.20 figures run the SDK's own generated module in .venv-sdk38 (CPython 3.8, protobuf 3.20.3).
protobuf 3.20 has no compiled wheel for CPython 3.11, so 3.11 gets its pure-Python runtime; we
measure that one (forced with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python) and, for
completeness, the C++ runtime 3.20 offers CPython 3.8. Run: .venv/bin/python bench/bench_protobuf.py
"""

from __future__ import annotations

import pathlib
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 20000

CASE = """
h = TransactionHeader(batcher_public_key='02' + 'a' * 64, family_name='intkey', family_version='1.0',
                      inputs=['1cf126' + 'ab' * 32], outputs=['1cf126' + 'ab' * 32], nonce='123',
                      payload_sha512='f' * 128, signer_public_key='02' + 'a' * 64)
start = time.perf_counter()
for _ in range(N):
    data = h.SerializeToString()
    TransactionHeader.FromString(data)
elapsed = (time.perf_counter() - start) / N * 1e6
"""


def ours() -> float:
    from trustmesh.ledger.protos import TransactionHeader  # noqa: F401
    scope = {"TransactionHeader": TransactionHeader, "time": time, "N": N}
    exec(CASE, scope)
    return scope["elapsed"]


def reference(implementation: str) -> float | None:
    python = ROOT / ".venv-sdk38" / "bin" / "python"
    if not python.exists():
        return None
    code = ("import time\nfrom sawtooth_sdk.protobuf.transaction_pb2 import TransactionHeader\n"
            f"N = {N}\n" + CASE + "print(elapsed)")
    env = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": implementation}
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout)


if __name__ == "__main__":
    fast = ours()
    print(f"upb (protobuf 7, descriptors from sawtooth-sdk): {fast:.2f} us per header serialize+parse")
    for implementation, label in (("python", "pure Python, what Python 3.11 gets"), ("cpp", "C++, CPython 3.8 only")):
        slow = reference(implementation)
        if slow is None:
            print("reference: .venv-sdk38 missing, run scripts/install")
            break
        print(f"protobuf 3.20 {label}: {slow:.2f} us  -> upb is {slow / fast:.1f}x faster")
