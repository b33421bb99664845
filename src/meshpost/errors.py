"""The whole meshpost exception tree.

Rule: this module imports nothing from meshpost. Every error a user can see is a
`MeshpostError` whose message says what to do next; third-party errors are translated at the
boundary where they occur.
"""

from __future__ import annotations

import re
from typing import ClassVar

# Exit codes of the `meshpost` command (README lists them); each error kind maps to one.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_NOT_RUNNING = 4
EXIT_REJECTED = 5
EXIT_STORE = 6
#: Exit code of `meshpost` when an endpoint to bind is taken by another process.
EXIT_ADDRESS_IN_USE = 7
#: Exit code of `meshpost cluster up/restart` when a node did not become ready.
EXIT_NODE_NOT_STARTED = 8

#: kind -> exit code of every error class: the one mapping the CLI, the control server and
#: the attached console use. Filled by `MeshpostError.__init_subclass__`.
EXIT_CODES: dict[str, int] = {}


class MeshpostError(Exception):
    """Root of every error meshpost raises on purpose.

    Every subclass names its `kind` (a stable snake_case word that crosses the control socket)
    and inherits or sets its `exit_code`: `class StoreFull(StoreError, kind="store_full")`.
    """

    kind: ClassVar[str] = "internal"
    exit_code: ClassVar[int] = EXIT_INTERNAL

    def __init_subclass__(cls, *, kind: str = "", exit_code: int | None = None,
                          **rest: object) -> None:
        super().__init_subclass__(**rest)
        # A subclass outside this module may leave its kind out: it gets its class name in
        # snake_case (a class here always names it; tests/unit/test_errors.py checks).
        cls.kind = kind or re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        if exit_code is not None:
            cls.exit_code = exit_code
        EXIT_CODES.setdefault(cls.kind, cls.exit_code)


EXIT_CODES[MeshpostError.kind] = EXIT_INTERNAL


def exit_code_for(kind: str) -> int:
    """The exit code of an error kind (an unknown kind, e.g. from a newer node: internal)."""
    return EXIT_CODES.get(kind, EXIT_INTERNAL)


def describe_error(exc: BaseException) -> str:
    """One line for a user: meshpost errors speak for themselves, others get their type."""
    if isinstance(exc, MeshpostError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# --- configuration and usage -------------------------------------------------------------


class ConfigError(MeshpostError, kind="config", exit_code=EXIT_USAGE):
    """The mesh or node configuration is invalid."""


class InvalidName(ConfigError, kind="invalid_name"):
    """A name that cannot name a node, or (`what`) a group, queue or mesh."""

    def __init__(self, name: str, why: str, what: str = "node") -> None:
        super().__init__(f"invalid {what} name {name!r}: {why}")
        self.name = name
        self.what = what


class UnknownPeer(MeshpostError, kind="unknown_peer", exit_code=EXIT_USAGE):
    def __init__(self, name: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown peer {name!r}; known peers: {listed}")
        self.name = name
        self.known = known


class UnknownBroadcast(MeshpostError, kind="unknown_broadcast", exit_code=EXIT_USAGE):
    """`broadcast status ID` for an id the node sent no broadcast with."""

    def __init__(self, node: str, logical_id: str) -> None:
        super().__init__(
            f"node {node!r} sent no broadcast {logical_id!r}: give the id that `meshpost send "
            f"--to all|GROUP` printed (`meshpost history --node {node} --group all` shows them)"
        )
        self.node = node
        self.logical_id = logical_id


class NoRecipients(MeshpostError, kind="no_recipients", exit_code=EXIT_USAGE):
    """A group (or `all`) that names no other node right now: nothing to send."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target!r} names no other node right now; nothing sent")
        self.target = target


class InvalidMessage(MeshpostError, kind="invalid_message", exit_code=EXIT_USAGE):
    """A message the local user tried to send is not acceptable."""


class EmptyMessage(InvalidMessage, kind="empty_message"):
    def __init__(self) -> None:
        super().__init__("message body is empty; type some text after the recipient")


class MessageTooLarge(InvalidMessage, kind="message_too_large"):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes, over the {limit}-byte limit "
            "(raise max_message_bytes in the mesh config on every node)"
        )
        self.size = size
        self.limit = limit


class InvalidLease(MeshpostError, kind="invalid_lease", exit_code=EXIT_USAGE):
    """A task lease that is not a finite number of seconds above 0 and at most a day."""

    def __init__(self, lease_s: object, limit_s: float) -> None:
        super().__init__(
            f"{lease_s!r} is not a lease: give seconds above 0, at most {limit_s:g} (a day)")
        self.lease_s = lease_s


class InvalidPrefetch(MeshpostError, kind="invalid_prefetch", exit_code=EXIT_USAGE):
    """A worker's prefetch (tasks it takes at once) that is not a whole number from 1 to the
    cap a ventilator honours."""

    def __init__(self, prefetch: object, limit: int) -> None:
        super().__init__(
            f"{prefetch!r} is not a prefetch: give how many tasks the worker takes at once, "
            f"a whole number from 1 to {limit}")
        self.prefetch = prefetch


class NodeClosed(MeshpostError, kind="node_closed", exit_code=EXIT_NOT_RUNNING):
    def __init__(self, name: str) -> None:
        super().__init__(f"node {name!r} is shut down; start it again to send")


class ReceiptTimeout(MeshpostError, kind="receipt_timeout", exit_code=EXIT_TIMEOUT):
    """No receipt arrived in time; the message stays queued and will still be delivered."""

    def __init__(self, message_id: str, to: str, timeout_s: float) -> None:
        super().__init__(
            f"no receipt from {to!r} for message {message_id} within {timeout_s:g}s; "
            "it stays queued and will be delivered when the peer is reachable"
        )
        self.message_id = message_id
        self.to = to
        self.timeout_s = timeout_s


class RequestTimeout(MeshpostError, kind="request_timeout", exit_code=EXIT_TIMEOUT):
    """No reply came in time. `outcome` ("not-delivered" or "delivered-unanswered") says
    whether the peer had the request; it stays queued, and a later reply is still stored
    and linked to it."""

    def __init__(self, request_id: str, to: str, timeout_s: float, outcome: str) -> None:
        what = ("was not delivered (no receipt): it stays queued and is delivered when the "
                "peer is reachable" if outcome == "not-delivered" else
                "was delivered (receipted) but not answered yet")
        super().__init__(
            f"no reply from {to!r} to request {request_id} within {timeout_s:g}s: it {what}; "
            "a reply that comes later is stored and linked to it in history"
        )
        self.request_id = request_id
        self.to = to
        self.timeout_s = timeout_s
        self.outcome = outcome


# --- the wire ---------------------------------------------------------------------------


class ProtocolError(MeshpostError, kind="protocol"):
    """A peer sent something the protocol does not allow. The frame is rejected, not us."""

    code = "protocol"


class MalformedFrame(ProtocolError, kind="malformed_frame"):
    code = "malformed"


class UnsupportedVersion(ProtocolError, kind="unsupported_version"):
    code = "version"

    def __init__(self, theirs: int, ours: int) -> None:
        super().__init__(
            f"peer speaks meshpost protocol version {theirs}, this node speaks {ours}; "
            "upgrade the older node"
        )
        self.theirs = theirs
        self.ours = ours


class IdentityMismatch(ProtocolError, kind="identity_mismatch"):
    code = "identity"


# --- transport --------------------------------------------------------------------------


class TransportError(MeshpostError, kind="transport"):
    pass


class EndpointInUse(TransportError, kind="endpoint_in_use", exit_code=EXIT_ADDRESS_IN_USE):
    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(
            f"cannot bind {endpoint}: {detail} (another node or program holds it; "
            "pick another port or stop that process)"
        )
        self.endpoint = endpoint


class InvalidEndpoint(TransportError, ConfigError, kind="invalid_endpoint",
                      exit_code=EXIT_USAGE):
    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"invalid endpoint {endpoint!r}: {detail}")
        self.endpoint = endpoint


class ControlUnavailable(TransportError, kind="not_running",
                         exit_code=EXIT_NOT_RUNNING):
    def __init__(self, name: str, where: str) -> None:
        super().__init__(
            f"node {name!r} is not running (no control endpoint at {where}); "
            f"start it with `meshpost node {name} ...`"
        )
        self.name = name


# --- storage ----------------------------------------------------------------------------


class StoreError(MeshpostError, kind="storage", exit_code=EXIT_STORE):
    pass


class DataDirNotWritable(StoreError, kind="data_dir_not_writable"):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"data directory {path} is not writable: {detail}")
        self.path = path


class DataDirIsAFile(StoreError, kind="data_dir_is_a_file"):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"data directory {path} is not writable: it is a file, not a folder; give --data "
            "a folder (a missing one is created) or move that file away"
        )
        self.path = path


class StoreLocked(StoreError, kind="store_locked"):
    def __init__(self, path: str) -> None:
        super().__init__(
            f"database {path} is locked by another process; "
            "is another node running with the same data directory?"
        )
        self.path = path


class StoreCorrupt(StoreError, kind="store_corrupt"):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"database {path} is corrupt ({detail}); restore it from a copy or move it aside"
        )
        self.path = path


class StoreFull(StoreError, kind="store_full"):
    def __init__(self, path: str) -> None:
        super().__init__(f"database {path} is full (disk or page limit); free space to continue")
        self.path = path


class RowRefused(StoreError, kind="row_refused"):
    """The store refused one write on its own: a row breaking a constraint of the schema, or
    a value SQLite cannot hold. Retrying cannot change that, so the writer drops that item
    alone (a peer's message is rejected `unstorable`) and commits the rest of its batch."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"database {path} refused a row ({detail}); it is not stored and will not be "
            "retried, and nothing else is affected (this is a bug: report it with node.log)"
        )
        self.path = path
        self.detail = detail


class SchemaTooNew(StoreError, kind="schema_too_new"):
    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"database {path} has schema version {found}, this meshpost supports up to "
            f"{supported}; upgrade meshpost"
        )


class NodeFailed(StoreError, kind="node_failed"):
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


class MessageRejected(MeshpostError, kind="rejected", exit_code=EXIT_REJECTED):
    """The receiver refused to store a message; it will not be resent."""

    def __init__(self, message_id: str, to: str, code: str, detail: str) -> None:
        super().__init__(f"{to!r} rejected message {message_id} ({code}): {detail}")
        self.message_id = message_id
        self.to = to
        self.code = code


# --- the control socket and the attached console -----------------------------------------


class BadControlRequest(MeshpostError, kind="bad_request", exit_code=EXIT_USAGE):
    """A control request the node cannot decode (a client of another version, or a bug)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"bad control request: {detail}")


class ControlTimeout(ControlUnavailable, kind="control_timeout", exit_code=EXIT_INTERNAL):
    """The node's process is alive but did not answer a control request in time."""

    def __init__(self, name: str, timeout_s: float) -> None:
        TransportError.__init__(
            self,
            f"node {name!r} is running but did not answer within {timeout_s:g}s; "
            "see its log (node.log in its data dir) before trying again"
        )
        self.name = name
        self.timeout_s = timeout_s


class NodeExited(ControlUnavailable, kind="node_exited"):
    """The node's process ended while a control request waited for its answer: unlike a
    node that was never running, it may have acted on the request first."""

    def __init__(self, name: str, pid: int) -> None:
        TransportError.__init__(
            self,
            f"node {name!r} stopped (process {pid} exited) before it answered; what it had "
            "stored stays in its store, and its pending messages go out when it runs again: "
            f"start it with `meshpost node {name} ...`, then see `meshpost history --node "
            f"{name}`"
        )
        self.name = name
        self.pid = pid


class NodeStopped(MeshpostError, kind="node_stopped", exit_code=EXIT_NOT_RUNNING):
    """The node an attached console drives went away while the console ran."""

    def __init__(self, name: str) -> None:
        super().__init__(f"node {name!r} stopped; start it again, then attach again")
        self.name = name


class NotStored(StoreError, kind="not_stored"):
    """The node could not store a message it accepted; the message is not stored (yet)."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(
            f"storage error at node {name!r}: {detail}; the message is NOT stored yet (the "
            "node keeps retrying and sends it once it is stored: check `meshpost history` "
            "before sending it again)"
        )
        self.name = name


class RemoteError(MeshpostError, kind="remote"):
    """An error a node reported over its control socket: its message, kind and exit code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # type: ignore[misc]  # this instance speaks for the node's class
        self.exit_code = exit_code_for(kind)  # type: ignore[misc]


# --- local clusters and exit codes of their own -------------------------------------------

class NoStore(StoreError, kind="no_store", exit_code=EXIT_NOT_RUNNING):
    """A data dir holds no meshpost database: the node never ran there (or it is elsewhere).
    `why` says what is there instead (an empty file, another program's database)."""

    # exit 4 as "not running": there is no such node here, nothing is broken

    def __init__(self, path: str, why: str = "") -> None:
        super().__init__(
            f"no meshpost database at {path}{f' ({why})' if why else ''}; has this node ever "
            "run? (give --data DIR if it keeps its data elsewhere)"
        )
        self.path = path


class ClusterError(MeshpostError, kind="cluster"):
    """`meshpost cluster` could not do what was asked."""


class ClusterNotRunning(ClusterError, kind="cluster_not_running", exit_code=EXIT_NOT_RUNNING):

    def __init__(self, root: str) -> None:
        super().__init__(
            f"no cluster is running in {root} (nothing recorded there); start one with "
            f"`meshpost cluster up N --data {root}`"
        )
        self.root = root


class ClusterAlreadyRunning(ClusterError, kind="cluster_already_running",
                            exit_code=EXIT_USAGE):

    def __init__(self, root: str, names: list[str]) -> None:
        super().__init__(
            f"a cluster already runs in {root} (nodes {', '.join(names)}); stop it with "
            f"`meshpost cluster down --data {root}`, pass --replace to stop it and start "
            "a new one, or pick another --data folder"
        )
        self.root = root
        self.names = names


class UnknownClusterNode(ClusterError, kind="unknown_cluster_node", exit_code=EXIT_USAGE):
    """`cluster restart NAME` for a name the cluster has no node of."""

    def __init__(self, root: str, name: str, names: list[str]) -> None:
        listed = ", ".join(names) if len(names) <= 12 else \
            f"{', '.join(names[:10])}, ... {names[-1]} ({len(names)} in all)"
        super().__init__(
            f"the cluster in {root} has no node {name!r}; its nodes: {listed or 'none'}")
        self.root = root
        self.name = name
        self.names = names


class ClusterTooBig(ClusterError, kind="cluster_too_big", exit_code=EXIT_USAGE):
    """`cluster up N` for more node processes than the open-file limit allows."""

    def __init__(self, count: int, need: int, limit: int, advice: str) -> None:
        super().__init__(
            f"{count} nodes would need about {need} open files in one process, over its "
            f"limit of {limit} (RLIMIT_NOFILE); {advice}"
        )
        self.count = count
        self.need = need
        self.limit = limit


class HostNotAnswering(ClusterError, kind="host_not_answering", exit_code=EXIT_NOT_RUNNING):
    """A host of many nodes (`meshpost host`) has no endpoint or did not answer in time."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"the node host of {where} is not answering ({why}); see its log "
                         "(hosts/NAME.log in the cluster folder)")
        self.where = where


class NodeNotStarted(ClusterError, kind="node_not_started", exit_code=EXIT_NODE_NOT_STARTED):
    """Nodes that did not answer on their control endpoint, each with the reason its log
    gives; the cluster stopped the others it had started."""

    def __init__(self, failures: dict[str, str]) -> None:
        lines = [f"  {name}: {why}" for name, why in failures.items()]
        super().__init__(
            f"{len(failures)} node(s) did not start:\n" + "\n".join(lines)
        )
        self.failures = failures
