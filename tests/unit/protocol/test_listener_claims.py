"""Who a keyless name is: decided by what the name's configured endpoint answers on this node's
own link (`endpoint_answered`), never by what a claimant says (docs/protocol.md 6.2).

Before, a name was first come, first served without keys: a stranger active under an idle
peer's name, with a node id of its own, kept that peer's own Hello refused (`LIVE_CLAIM`) for as
long as it stayed active. Now a refused claim asks the endpoint (`ClaimCheckWanted`, at most
once per name per CLAIM_CHECK_INTERVAL_NS) and the claimant whose node id it answers as wins.
"""

from __future__ import annotations

from typing import TypeVar

from tests.unit.protocol.test_dialer import Wire, msgs
from tests.unit.protocol.test_listener import (
    WALL,
    connected,
    make_listener,
    refusal,
    send,
)

from meshpost.node.claims import CLAIM_CHECK_TIMEOUT_S
from meshpost.protocol import (
    PROTOCOL_VERSION,
    Batch,
    ClaimCheckWanted,
    ClaimSettled,
    ClaimUnchecked,
    Event,
    Frame,
    Hello,
    LinkState,
    MessagesArrived,
    MessagesDelivered,
    Ping,
    Refuse,
    RefuseCode,
    SessionClaimed,
    Welcome,
    encode,
)
from meshpost.protocol.claims import (
    CLAIM_CHECK_INTERVAL_NS,
    CLAIMANT_KEPT_NS,
    MAX_CLAIMANTS_PER_NAME,
)
from meshpost.protocol.listener import LIVE_SESSION_NS, Listener, SessionState

INTERVAL = CLAIM_CHECK_INTERVAL_NS
E = TypeVar("E")


def as_node(node_id: str, name: str = "alice") -> Hello:
    """A Hello as `name` from node `node_id` (anyone can say either)."""
    return Hello(PROTOCOL_VERSION, node_id, name, WALL, 1)


def checks(events: list[Event]) -> list[ClaimCheckWanted]:
    return [e for e in events if isinstance(e, ClaimCheckWanted)]


def of_type(events: list[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def stranger_in(wall_ns: int = WALL + 5) -> Listener:
    """bob's listener with a stranger welcomed as alice (node-x) on connection "x": bob knew
    nothing of alice (first come, first served)."""
    listener = make_listener()
    [welcome] = send(listener, as_node("node-x"), "x", wall_ns=wall_ns)
    assert isinstance(welcome, Welcome)
    listener.events()
    return listener


def answered(listener: Listener, peer: str, node_id: str,
             wall_ns: int = WALL + 10) -> list[tuple[str, Frame]]:
    listener.endpoint_answered(peer, node_id, wall_ns, 9)
    return listener.frames_to_send()


# -- a refused claim asks the endpoint --------------------------------------------------------


def test_a_hello_against_a_live_session_of_another_node_id_is_refused_and_asks_the_endpoint(
) -> None:
    listener = stranger_in()
    refused = refusal(send(listener, as_node("node-alice"), "alice"))
    assert refused.code == RefuseCode.IDENTITY
    assert "asking the endpoint configured for 'alice'" in refused.detail
    events = listener.events()
    [claimed] = of_type(events, SessionClaimed)
    assert claimed.refused
    assert checks(events) == [ClaimCheckWanted("alice", "node-alice", None)]


def test_hellos_however_many_ask_the_endpoint_once_per_interval() -> None:
    listener = stranger_in()
    asked: list[ClaimCheckWanted] = []
    for i in range(50):
        send(listener, as_node(f"node-{i}"), f"c{i}", wall_ns=WALL + 10 + i)
        asked += checks(listener.events())
    assert len(asked) == 1
    # The check settled (no answer): the next one waits out the interval from the first.
    listener.endpoint_unanswered("alice")
    send(listener, as_node("node-y"), "y", wall_ns=WALL + 10 + INTERVAL - 1)
    assert checks(listener.events()) == []
    send(listener, as_node("node-y"), "y", wall_ns=WALL + 10 + INTERVAL)
    assert len(checks(listener.events())) == 1


def test_a_check_never_settled_is_taken_as_lost_after_the_interval() -> None:
    listener = stranger_in()
    send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 10)
    assert len(checks(listener.events())) == 1
    send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 10 + INTERVAL)
    assert len(checks(listener.events())) == 1
    # The claimant, kept again by its new Hello, is decided by the new check's answer.
    frames = answered(listener, "alice", "node-alice", WALL + 11 + INTERVAL)
    assert [(to, type(f)) for to, f in frames] == [("alice", Welcome)]


def test_the_node_settles_a_check_before_the_listener_may_ask_again() -> None:
    assert CLAIM_CHECK_TIMEOUT_S * 1e9 < CLAIM_CHECK_INTERVAL_NS


# -- the endpoint's answer decides ------------------------------------------------------------


def test_the_endpoint_answering_as_the_claimant_ends_the_stranger_and_welcomes_the_claimant(
) -> None:
    listener = stranger_in()
    refusal(send(listener, as_node("node-alice"), "alice"))
    listener.events()
    frames = answered(listener, "alice", "node-alice")
    [(to, welcome)] = frames
    assert to == "alice"
    assert isinstance(welcome, Welcome)
    assert welcome.node_id == "node-b"
    assert listener.session_peer("alice") == "alice"
    assert listener.session_state("x") is SessionState.NEW
    assert listener.events() == [ClaimSettled("alice", "node-alice", evicted=1, welcomed=1,
                                              asked=True)]
    # The stranger's next frames get hello-required, its Hello a name clash (no new check:
    # the endpoint answered just now).
    [required] = send(listener, Ping(WALL), "x", wall_ns=WALL + 20)
    assert isinstance(required, Refuse)
    assert required.code == RefuseCode.HELLO_REQUIRED
    refused = refusal(send(listener, as_node("node-x"), "x", wall_ns=WALL + 30))
    assert refused.code == RefuseCode.IDENTITY
    assert "'bob' knows 'alice' as node node-alice: its configured endpoint" in refused.detail
    events = listener.events()
    assert [e.refused for e in of_type(events, SessionClaimed)] == [True]
    assert checks(events) == []
    # The welcomed claimant's messages are taken as alice's.
    assert send(listener, Batch(WALL, msgs([1], body="x")), "alice", wall_ns=WALL + 40) == []
    [arrived] = of_type(listener.events(), MessagesArrived)
    assert (arrived.peer, arrived.connection) == ("alice", "alice")


def test_the_endpoint_answering_as_the_holder_keeps_the_claimant_refused() -> None:
    listener = connected()  # alice (node-alice) on connection "alice"
    refusal(send(listener, as_node("node-x"), "x"))
    [wanted] = checks(listener.events())
    assert wanted == ClaimCheckWanted("alice", "node-x", None)
    assert answered(listener, "alice", "node-alice") == []
    assert listener.events() == [ClaimSettled("alice", "node-alice", evicted=0, welcomed=0,
                                              asked=True)]
    assert listener.session_peer("alice") == "alice"
    assert listener.session_state("x") is SessionState.NEW
    # Its retries are refused at once: within the interval, without asking again.
    refusal(send(listener, as_node("node-x"), "x", wall_ns=WALL + 20))
    assert checks(listener.events()) == []


def test_what_the_endpoint_answered_refuses_another_node_id_even_with_no_session_open() -> None:
    """bob's own link to alice was welcomed by node-alice: a stranger as alice is refused
    even while alice has no session at bob (her link idled out), where before it was
    welcomed (first come, first served)."""
    listener = make_listener()
    assert answered(listener, "alice", "node-alice") == []
    assert listener.events() == []  # nothing to settle
    refused = refusal(send(listener, as_node("node-x"), "x", wall_ns=WALL + 20))
    assert refused.code == RefuseCode.IDENTITY
    [welcome] = send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 30)
    assert isinstance(welcome, Welcome)


def test_a_peer_restarted_with_a_new_node_id_is_welcomed_once_its_endpoint_says_so() -> None:
    """What bob's link learnt is never a lock-out: past the interval a Hello of another node
    id asks the endpoint again, and its answer replaces what it said before."""
    listener = make_listener()
    answered(listener, "alice", "node-old")
    [welcome] = send(listener, as_node("node-old"), "old", wall_ns=WALL + 20)
    assert isinstance(welcome, Welcome)
    listener.events()
    # alice restarts with a new data dir (node-new); the old session lingers, silent.
    later = WALL + 20 + INTERVAL
    refusal(send(listener, as_node("node-new"), "new", wall_ns=later))
    assert checks(listener.events()) == [ClaimCheckWanted("alice", "node-new", "node-old")]
    frames = answered(listener, "alice", "node-new", later + 1)
    assert [(to, type(f)) for to, f in frames] == [("new", Welcome)]
    assert listener.session_state("old") is SessionState.NEW
    assert listener.events() == [ClaimSettled("alice", "node-new", evicted=1, welcomed=1,
                                              asked=True)]


def test_a_claimant_refused_without_a_check_is_welcomed_by_the_next_answer_of_its_node_id(
) -> None:
    """The restart race: bob's link to alice was welcomed by node-old just before alice came
    back as node-new, so node-new's Hello is refused without asking (the answer is fresh);
    bob's own link is then welcomed by node-new (its redial): that answer welcomes it."""
    listener = make_listener()
    answered(listener, "alice", "node-old")
    refusal(send(listener, as_node("node-new"), "new", wall_ns=WALL + 20))
    assert checks(listener.events()) == []
    frames = answered(listener, "alice", "node-new", WALL + 30)
    assert [(to, type(f)) for to, f in frames] == [("new", Welcome)]


def test_a_claimant_is_welcomed_by_an_answer_only_until_its_dialer_would_have_retried() -> None:
    listener = make_listener()
    answered(listener, "alice", "node-old")
    refusal(send(listener, as_node("node-new"), "new", wall_ns=WALL + 20))
    assert answered(listener, "alice", "node-new", WALL + 20 + CLAIMANT_KEPT_NS) == []
    assert listener.session_state("new") is SessionState.NEW


def test_no_answer_leaves_the_name_first_come_first_served() -> None:
    listener = stranger_in()
    refusal(send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 10))
    assert len(checks(listener.events())) == 1
    listener.endpoint_unanswered("alice")
    assert listener.events() == [ClaimUnchecked("alice", refused=1)]
    assert listener.frames_to_send() == []
    assert listener.session_peer("x") == "alice"  # the stranger keeps the name
    # ...while it is live (as before); once it has been silent LIVE_SESSION_NS, alice is in.
    refusal(send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 20))
    [welcome] = send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 5 + LIVE_SESSION_NS)
    assert isinstance(welcome, Welcome)


def test_no_answer_forgets_what_the_endpoint_said_before() -> None:
    """An endpoint that stopped answering proves nothing any more: a peer restarted with a
    new node id is judged as before checks existed, not refused for good."""
    listener = make_listener()
    answered(listener, "alice", "node-old")
    later = WALL + INTERVAL + 100
    refusal(send(listener, as_node("node-new"), "new", wall_ns=later))
    assert len(checks(listener.events())) == 1
    listener.endpoint_unanswered("alice")
    listener.events()
    [welcome] = send(listener, as_node("node-new"), "new", wall_ns=later + 1)
    assert isinstance(welcome, Welcome)


def test_claimants_kept_while_asking_are_bounded_per_name() -> None:
    listener = stranger_in()
    for i in range(MAX_CLAIMANTS_PER_NAME + 3):
        send(listener, as_node("node-alice"), f"c{i}", wall_ns=WALL + 10 + i)
    frames = answered(listener, "alice", "node-alice", WALL + 100)
    welcomed = [to for to, f in frames if isinstance(f, Welcome)]
    assert welcomed == [f"c{i}" for i in range(3, MAX_CLAIMANTS_PER_NAME + 3)]


def test_a_claimant_welcomed_otherwise_meanwhile_is_not_welcomed_twice() -> None:
    listener = stranger_in()
    refusal(send(listener, as_node("node-alice"), "alice", wall_ns=WALL + 10))
    listener.events()
    send(listener, as_node("node-x"), "alice", wall_ns=WALL + 11)  # the same connection, as x
    assert listener.session_peer("alice") == "alice"
    frames = answered(listener, "alice", "node-alice", WALL + 20)
    assert frames == []  # its own later Hello decided; its session (node-x) ended
    assert listener.session_state("alice") is SessionState.NEW


def test_an_answer_for_a_name_that_is_no_peer_changes_nothing() -> None:
    listener = make_listener()
    assert answered(listener, "mallory", "node-m") == []
    assert listener.events() == []
    [welcome] = send(listener, as_node("node-x"), "x")
    assert isinstance(welcome, Welcome)


def test_under_secure_the_key_decides_and_nothing_is_asked() -> None:
    listener = connected()
    [welcome] = send(listener, as_node("node-x"), "x", authenticated="alice")
    assert isinstance(welcome, Welcome)
    assert checks(listener.events()) == []


# -- the dialer's side: a late Welcome ----------------------------------------------------------


def test_a_dialer_refused_while_its_claim_is_checked_is_welcomed_and_sends() -> None:
    """alice's real dialer against bob's listener, with a stranger under her name: refused,
    then welcomed by bob once its endpoint check answers node-a, without a second Hello; the
    late Welcome is no round-trip sample (the Refuse answered the Hello)."""
    wire = Wire()
    stranger = as_node("node-x")
    wire.listener.receive("x", encode(stranger), wire.bob_wall, 0)
    wire.listener.frames_to_send()
    wire.listener.events()
    wire.dialer.enqueue(msgs([1, 2]))
    refused = wire.to_listener(wire.poll())
    assert [type(f) for f in refused] == [Refuse]
    wire.to_dialer(refused)
    assert wire.dialer.state is LinkState.REFUSED
    assert checks(wire.listener_events) == [ClaimCheckWanted("alice", "node-a", None)]
    answers_before = wire.dialer.answers
    wire.advance(0.05)  # bob asks alice's endpoint: a round trip on its own link
    wire.listener.endpoint_answered("alice", "node-a", wire.bob_wall, 0)
    late = wire.listener_answers()
    assert [type(f) for f in late] == [Welcome]
    sent = wire.to_dialer(late)
    assert wire.dialer.state is LinkState.READY
    assert wire.dialer.answers == answers_before
    assert wire.dialer.path_srtt_s is None
    wire.exchange(sent)
    assert sorted(s for d in wire.of_type(MessagesDelivered) for s in d.seqs) == [1, 2]
    assert sorted(wire.store) == ["id-alice-1", "id-alice-2"]
    # The stranger's session ended: its pings get hello-required.
    wire.listener.receive("x", encode(Ping(wire.bob_wall)), wire.bob_wall, 0)
    [(to, required)] = wire.listener.frames_to_send()
    assert to == "x"
    assert isinstance(required, Refuse)
    assert required.code == RefuseCode.HELLO_REQUIRED
