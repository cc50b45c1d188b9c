"""The federation's on-chain rules: one Sawtooth transaction family per module.

Every handler is a pure function of (payload, state): no clocks (time comes from BlockInfo),
no randomness, no network or off-chain store inside apply(). Payloads are canonical CBOR.
State layout and addresses: scheduling/layout.py and the README's "Transaction families".
"""
