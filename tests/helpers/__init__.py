"""What the tests share: real servers and peers started on loopback (devnet_process, wire_peer,
client_wire_peer, tcp_proxy), ledger client helpers (ledger_helpers) and a whole federation round
on dict state through the handlers' pure apply() (family_scenario)."""
