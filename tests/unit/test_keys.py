"""`meshpost.keys`: what authorized_keys may say. A line binds a key to a name both ways (who
a connection with that key is, which key dialing that name expects), so a key that is not a
key, a key under two names or a name with two keys is refused naming the lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from meshpost import keys
from meshpost.errors import ConfigError


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / keys.AUTHORIZED_KEYS).write_text(text, encoding="utf-8")
    return folder


def test_lines_comments_and_a_repeated_line_are_read_as_one_key_a_name(tmp_path: Path) -> None:
    a, _ = zmq.curve_keypair()
    b, _ = zmq.curve_keypair()
    folder = write(tmp_path, f"# peers\n\n  A {a.decode()}  \nB\t{b.decode()}\nA {a.decode()}\n")
    assert keys.load_authorized(folder) == {"A": a, "B": b}


@pytest.mark.parametrize("key", [
    "~" * 40,  # outside ZeroMQ's Z85 alphabet: libzmq refused it at the first dial
    "#" * 39 + "é",  # not ASCII
    "%" * 40,  # Z85 characters whose groups overflow 32 bits
    "0" * 39,
])
def test_a_key_that_libzmq_would_refuse_is_refused_at_load_naming_its_line(
    tmp_path: Path, key: str,
) -> None:
    folder = write(tmp_path, f"# peers\nB {key}\n")
    with pytest.raises(ConfigError, match=r"authorized_keys:2: expected 'NAME Z85KEY'"):
        keys.load_authorized(folder)


def test_one_key_under_two_names_is_refused(tmp_path: Path) -> None:
    """The ZAP handler names a connection after its key: with the key under B and C, a
    connection with it was silently C's only, and B's Hello on it refused."""
    k, _ = zmq.curve_keypair()
    folder = write(tmp_path, f"B {k.decode()}\nC {k.decode()}\n")
    with pytest.raises(ConfigError, match=r":2: this key is B's on line 1"):
        keys.load_authorized(folder)


def test_a_name_with_two_keys_is_refused(tmp_path: Path) -> None:
    """`keys show --node B >> authorized_keys` after B made a new key: which one is B's is
    the user's to say (the last line silently won)."""
    old, _ = zmq.curve_keypair()
    new, _ = zmq.curve_keypair()
    folder = write(tmp_path, f"B {old.decode()}\n# B again\nB {new.decode()}\n")
    with pytest.raises(ConfigError, match=r":3: B has another key on line 1"):
        keys.load_authorized(folder)


def test_a_bad_name_is_refused_naming_its_line(tmp_path: Path) -> None:
    k, _ = zmq.curve_keypair()
    folder = write(tmp_path, f"no/slash {k.decode()}\n")
    with pytest.raises(ConfigError, match=r"authorized_keys:1: invalid node name"):
        keys.load_authorized(folder)


def test_generated_public_keys_pass_the_check(tmp_path: Path) -> None:
    public = keys.generate(tmp_path / "A")
    assert keys.z85_key(public.decode()) == public
    assert keys.load_own(tmp_path / "A")[1] == public


# -- what a reload changes (`transport.security.KeyChanges`) ----------------------------------

def test_the_diff_of_two_lists_names_added_removed_and_changed_sorted() -> None:
    from meshpost.transport.security import KeyChanges

    k1, k2, k3, k4 = (zmq.curve_keypair()[0] for _ in range(4))
    old = {"P": k1, "Q": k2, "B": k3}
    new = {"P": k1, "Q": k4, "C": k3, "A": k2}
    changes = KeyChanges.between(old, new)
    assert changes == KeyChanges(added=("A", "C"), removed=("B",), changed=("Q",))
    assert changes.cut == {"B", "Q"}
    assert changes.describe() == "added A, C; removed B; changed Q"
    assert changes  # something changed


def test_the_same_list_again_is_no_change() -> None:
    from meshpost.transport.security import KeyChanges

    key = zmq.curve_keypair()[0]
    same = KeyChanges.between({"P": key}, {"P": key})
    assert not same and same.cut == frozenset() and same.describe() == "no change"


def test_a_key_moved_to_another_name_is_one_name_removed_and_one_added() -> None:
    """A key proves one name: moved, the old name's connections made with it are cut."""
    from meshpost.transport.security import KeyChanges

    key = zmq.curve_keypair()[0]
    moved = KeyChanges.between({"P": key}, {"R": key})
    assert (moved.added, moved.removed, moved.changed) == (("R",), ("P",), ())
