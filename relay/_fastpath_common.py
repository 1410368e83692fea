# relay/net/server.py still imports local_failure from here; it moves to relay.ends with that file's rewrite.
from relay.ends import local_failure  # noqa: F401
