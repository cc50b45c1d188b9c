"""Off-chain stores of TrustMesh FL: Redis (hot, content-addressed), CouchDB (durable history).

    servers        start/stop a real redis-server and a CouchDB-protocol server (pouchdb-server)
                   on free loopback ports, for tests and `trustmesh up`
    redis_client   a bounded redis.asyncio connection pool (client, connect)
    blobs          content-addressed blobs (BlobStore): readers verify the sha256 before use
    task_queue     at-least-once task delivery on Redis Streams (TaskQueue)
    heartbeats     node liveness on the Redis server's clock (Heartbeats)
    federation_cache  the design's Redis copy of the federation rounds, for tools that watch one
    couch          small async CouchDB client and the documents of the design (workflows, rounds
                   with their global model as an attachment, participation records)
    data_envelope  raw IoT data encrypted for one compute node (X25519 + HKDF-SHA256 + AES-GCM)

Every off-chain blob is named by its sha256 and the chain holds that digest: readers here verify
before they return bytes.
"""
