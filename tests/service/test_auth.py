"""API keys: roles from hashed keys, and public key ids that cannot be checked against guesses offline."""

import hashlib

from service.auth import KeyRing


def test_key_ids_are_keyed_hashes_shared_by_every_replica(tmp_path):
    first = KeyRing("weak:editor,other:reader", tmp_path / "api-keys.json")
    second = KeyRing("weak:editor,other:reader", tmp_path / "api-keys.json")  # another replica, same volume
    assert first.role_of("weak") == "editor" and first.role_of("guess") is None
    assert first.key_id("weak") == second.key_id("weak") != first.key_id("other")
    assert first.key_id("weak") != hashlib.sha256(b"weak").hexdigest()[:12]  # a guess cannot be checked offline
    assert (tmp_path / "key-id-secret").stat().st_mode & 0o777 == 0o600
    elsewhere = KeyRing("weak:editor", tmp_path / "other-install" / "api-keys.json")
    assert elsewhere.key_id("weak") != first.key_id("weak")
