"""The service on Ray Serve: one ingress, N model replicas that multiplex adapters over a shared store.

- `app.py` builds the Serve application from the settings and runs it (`python -m service serve-ray`).
- `ingress.py` serves the REST contract; admin operations go to the store and the cluster state,
  generations to a replica chosen by Serve's model multiplexing (`adapter_id@version`).
- `replica.py` is one model replica: the same engine and runtime as `serve`, adapters loaded on demand.
- `resident.py` is a replica's book of resident adapters (in-flight counts, eviction, freeing).
- `cluster_state.py` is the named actor holding id -> version, the active adapter and delete acks.
- `shared_store.py` is how replicas read adapters (a shared filesystem path; other backends fit behind it).

Only `app.py`, `ingress.py` and `replica.py` import ray, so the rest of the package works without it.
"""
