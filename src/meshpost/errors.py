"""The whole meshpost exception tree.

Rule: this module imports nothing from meshpost. Every error a user can see is a
`MeshpostError` whose message says what to do next; third-party errors are translated at the
boundary where they occur.
"""

from __future__ import annotations


class MeshpostError(Exception):
    """Root of every error meshpost raises on purpose."""


# --- configuration and usage -------------------------------------------------------------


class ConfigError(MeshpostError):
    """The mesh or node configuration is invalid."""


class InvalidName(ConfigError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"invalid node name {name!r}: {why}")
        self.name = name


class UnknownPeer(MeshpostError):
    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown peer {name!r}; known peers: {listed}")
        self.name = name
        self.known = known


class InvalidMessage(MeshpostError):
    """A message the local user tried to send is not acceptable."""


class EmptyMessage(InvalidMessage):
    def __init__(self) -> None:
        super().__init__("message body is empty; type some text after the recipient")


class MessageTooLarge(InvalidMessage):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes, over the {limit}-byte limit "
            "(raise max_message_bytes in the mesh config on every node)"
        )
        self.size = size
        self.limit = limit


class NodeClosed(MeshpostError):
    def __init__(self, name: str) -> None:
        super().__init__(f"node {name!r} is shut down; start it again to send")


class ReceiptTimeout(MeshpostError):
    """No receipt arrived in time; the message stays queued and will still be delivered."""

    def __init__(self, message_id: str, to: str, timeout_s: float) -> None:
        super().__init__(
            f"no receipt from {to!r} for message {message_id} within {timeout_s:g}s; "
            "it stays queued and will be delivered when the peer is reachable"
        )
        self.message_id = message_id
        self.to = to
        self.timeout_s = timeout_s


# --- the wire ---------------------------------------------------------------------------


class ProtocolError(MeshpostError):
    """A peer sent something the protocol does not allow. The frame is rejected, not us."""

    code = "protocol"


class MalformedFrame(ProtocolError):
    code = "malformed"


class UnsupportedVersion(ProtocolError):
    code = "version"

    def __init__(self, theirs: int, ours: int) -> None:
        super().__init__(
            f"peer speaks meshpost protocol version {theirs}, this node speaks {ours}; "
            "upgrade the older node"
        )
        self.theirs = theirs
        self.ours = ours


class IdentityMismatch(ProtocolError):
    code = "identity"


# --- transport --------------------------------------------------------------------------


class TransportError(MeshpostError):
    pass


class EndpointInUse(TransportError):
    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(
            f"cannot bind {endpoint}: {detail} (another node or program holds it; "
            "pick another port or stop that process)"
        )
        self.endpoint = endpoint


class InvalidEndpoint(TransportError, ConfigError):
    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"invalid endpoint {endpoint!r}: {detail}")
        self.endpoint = endpoint


class ControlUnavailable(TransportError):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(
            f"node {name!r} is not running (no control endpoint at {where}); "
            f"start it with `meshpost node {name} ...`"
        )
        self.name = name


# --- storage ----------------------------------------------------------------------------


class StoreError(MeshpostError):
    pass


class DataDirNotWritable(StoreError):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"data directory {path} is not writable: {detail}")
        self.path = path


class StoreLocked(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"database {path} is locked by another process; "
            "is another node running with the same data directory?"
        )
        self.path = path


class StoreCorrupt(StoreError):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"database {path} is corrupt ({detail}); restore it from a copy or move it aside"
        )
        self.path = path


class StoreFull(StoreError):
    def __init__(self, path: str) -> None:
        super().__init__(f"database {path} is full (disk or page limit); free space to continue")
        self.path = path


class SchemaTooNew(StoreError):
    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"database {path} has schema version {found}, this meshpost supports up to "
            f"{supported}; upgrade meshpost"
        )


class NodeFailed(StoreError):
    """The node's store failed in a way retrying cannot fix; the node accepts nothing more.
    Every write that was pending failed with the same cause."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(
            f"node {name!r} stopped accepting messages after an unexpected store failure "
            f"({type(cause).__name__}: {cause}); see its log, then restart it"
        )
        self.name = name
        self.cause = cause
        self.__cause__ = cause


class MessageRejected(MeshpostError):
    """The receiver refused to store a message; it will not be resent."""

    def __init__(self, message_id: str, to: str, code: str, detail: str) -> None:
        super().__init__(f"{to!r} rejected message {message_id} ({code}): {detail}")
        self.message_id = message_id
        self.to = to
        self.code = code


# --- local clusters and exit codes of their own -------------------------------------------

#: Exit code of `meshpost` when an endpoint to bind is taken by another process.
EXIT_ADDRESS_IN_USE = 7
#: Exit code of `meshpost cluster up/restart` when a node did not become ready.
EXIT_NODE_NOT_STARTED = 8


class NoStore(StoreError):
    """A data dir holds no meshpost database: the node never ran there (or it is elsewhere)."""

    exit_code = 4  # as "not running": there is no such node here, nothing is broken

    def __init__(self, path: str) -> None:
        super().__init__(
            f"no meshpost database at {path}; has this node ever run? (give --data DIR if it "
            "keeps its data elsewhere)"
        )
        self.path = path


class ClusterError(MeshpostError):
    """`meshpost cluster` could not do what was asked."""


class ClusterNotRunning(ClusterError):
    exit_code = 4

    def __init__(self, root: str) -> None:
        super().__init__(
            f"no cluster is running in {root} (nothing recorded there); start one with "
            f"`meshpost cluster up N --data {root}`"
        )
        self.root = root


class ClusterAlreadyRunning(ClusterError):
    exit_code = 2

    def __init__(self, root: str, names: list[str]) -> None:
        super().__init__(
            f"a cluster already runs in {root} (nodes {', '.join(names)}); stop it with "
            f"`meshpost cluster down --data {root}`, pass --replace to stop it and start "
            "a new one, or pick another --data folder"
        )
        self.root = root
        self.names = names


class NodeNotStarted(ClusterError):
    """Nodes that did not answer on their control endpoint, each with the reason its log
    gives; the cluster stopped the others it had started."""

    exit_code = EXIT_NODE_NOT_STARTED

    def __init__(self, failures: dict[str, str]) -> None:
        lines = [f"  {name}: {why}" for name, why in failures.items()]
        super().__init__(
            f"{len(failures)} node(s) did not start:\n" + "\n".join(lines)
        )
        self.failures = failures
