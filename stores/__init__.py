"""Off-chain stores of TrustMesh FL: Redis (hot, content-addressed), CouchDB (durable history).

    servers        start/stop a real redis-server and a CouchDB-protocol server (pouchdb-server)
                   on free loopback ports, for tests and `trustmesh up`
    redis_state    federation cache filled from committed chain events, content-addressed blobs,
                   task delivery on Redis Streams, node heartbeats
    couch          small async CouchDB client and the documents of the design (workflows, rounds
                   with their global model as an attachment, participation records)
    data_envelope  raw IoT data encrypted for one compute node (X25519 + HKDF-SHA256 + AES-GCM)

Every off-chain blob is named by its sha256 and the chain holds that digest: readers here verify
before they return bytes.
"""
