"""TrustMesh FL: federated learning whose every round is a verifiable Sawtooth transaction."""

__version__ = "0.1.0"
