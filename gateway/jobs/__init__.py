"""Long-running jobs: records, queue, worker pool and the job kinds.

- ``model``        the job record, its states and public form;
- ``kinds``        the plugin contract of job kinds and their registry;
- ``builtin``      the kinds shipped: ``db-refresh`` and ``report``;
- ``store``        the store contract and the in-memory store;
- ``redis_store``  records, queue (a stream with a consumer group) and leases in Redis;
- ``runner``       the worker pool, which runs jobs and publishes their events;
- ``service``      what the HTTP API and ``gateway worker`` use;
- ``worker``       the ``gateway worker`` process.
"""
