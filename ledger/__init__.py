"""Sawtooth 1.2-compatible ledger layer: signing, builders, processor runtime, clients, dev validator."""
