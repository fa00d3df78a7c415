"""The Redis Streams worker pool: GPU workers on any number of hosts (`mgie-worker`).

``connection`` connects and checks the server, ``keys`` names everything under ``MGIE_REDIS_PREFIX``,
``payloads`` encodes and validates what crosses Redis, ``scripts`` holds the Lua that keeps claims and
results owner-checked, ``streams`` is the protocol both sides speak, ``service`` runs one worker process,
and ``cli`` is the console script. Nothing here imports discord; only ``service`` imports the engine's worker.
"""
