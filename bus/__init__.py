"""bus: the control plane, ZeroMQ with msgpack envelopes (the ZeroMQ guide's broker pattern).

envelope.py (the one frame format), errors.py (errors that cross the wire), registry.py (the broker's
table of live actors, pure data), broker.py (one ROUTER socket: routing, pub/sub, heartbeats),
client.py (the asyncio DEALER every actor uses), deadlines.py (request deadlines), keys.py (CurveZMQ keys,
one pair per role class), trust.py (which key registers which role, who may send and publish what).
Imports nothing of ours: it carries small messages and knows no actor, tensor or model.
"""
