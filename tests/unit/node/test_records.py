"""The API's records keep the behaviour callers rely on, whatever class builds them."""

from __future__ import annotations

import pickle

import msgspec
import pytest

from meshpost import Receipt

FIELDS = ("message_id", "to", "seq", "sent_at_ns", "delivered_at_ns", "received_at_ns",
          "recorded_at_ns", "sync")


def receipt(seq: int = 1) -> Receipt:
    return Receipt("m1", "B", seq, 10, 30, 20, 40, "normal")


def test_receipt_fields_in_order_by_name_and_by_position() -> None:
    r = receipt()
    assert r == Receipt(message_id="m1", to="B", seq=1, sent_at_ns=10, delivered_at_ns=30,
                        received_at_ns=20, recorded_at_ns=40, sync="normal")
    assert tuple(f.name for f in msgspec.structs.fields(Receipt)) == FIELDS
    assert Receipt.__match_args__ == FIELDS
    match r:
        case Receipt(message_id, to, seq, sync=sync):
            assert (message_id, to, seq, sync) == ("m1", "B", 1, "normal")
        case _:
            pytest.fail("a Receipt matches its positional pattern")


def test_receipt_is_a_value_immutable_hashable_and_picklable() -> None:
    r = receipt()
    assert r == receipt() and r != receipt(seq=2) and r != ("m1", "B", 1)
    assert hash(r) == hash(receipt()) and len({r, receipt(), receipt(seq=2)}) == 2
    with pytest.raises(AttributeError):
        r.seq = 2  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(r)) == r
    assert repr(r) == ("Receipt(message_id='m1', to='B', seq=1, sent_at_ns=10, "
                       "delivered_at_ns=30, received_at_ns=20, recorded_at_ns=40, sync='normal')")


def test_receipt_copy_with_changes() -> None:
    r = receipt()
    changed = msgspec.structs.replace(r, seq=2, sync="full")
    assert changed == Receipt("m1", "B", 2, 10, 30, 20, 40, "full")
    assert r == receipt()  # the original is untouched
