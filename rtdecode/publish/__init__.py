"""Publishing to operator displays over ZeroMQ: the wire protocol (``protocol``), the daemon's publisher with its
late-joiner snapshot (``publisher``), the Python client (``subscriber``) and CURVE keys (``keys``).

``docs/protocol.md`` is the contract display developers code against; ``tests/rtdecode/publish`` checks the code
against it (its minimal client example runs against a real publisher).
"""
