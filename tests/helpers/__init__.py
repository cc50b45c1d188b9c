"""What the tests share: real servers and peers started on loopback (devnet_process, servers,
wire_peer, client_wire_peer, tcp_proxy), ledger client helpers (ledger_helpers), the local network
driven as a user does (local_network), a whole federation in one process (federation_run), the
families' rules on dict state through the handlers' pure apply() (family_scenario: one whole
round; dict_ledger: batches in, statuses and receipts out, like the validator) and deterministic
state data (state_data). Fixtures every module may use live in tests/conftest.py."""
