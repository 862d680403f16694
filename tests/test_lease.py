"""The store lease: one holder at a time, expiry, takeover, on a folder and on S3 (moto)."""

from __future__ import annotations

import threading
import time

import pytest

from persona_core.store import lease as lease_mod
from persona_core.store.lease import Lease, LeaseHeld, LeaseLost
from persona_core.store.store import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_url"))


def test_second_holder_is_refused_until_release(store):
    a = Lease(store, "nightly", ttl_s=60, owner="a")
    b = Lease(store, "nightly", ttl_s=60, owner="b")
    a.acquire()
    with pytest.raises(LeaseHeld, match="held by a"):
        b.acquire()
    a.release()
    assert b.acquire().owner == "b"
    assert store.read_json("leases/nightly.json")["owner"] == "b"
    b.release()
    assert not store.exists("leases/nightly.json")


def test_expired_lease_is_taken_over_and_old_holder_learns_it(store):
    a = Lease(store, "n", ttl_s=0.5, owner="a")
    a.acquire()
    time.sleep(0.7)
    b = Lease(store, "n", ttl_s=60, owner="b")
    b.acquire()
    with pytest.raises(LeaseLost):
        a.renew()
    a.release()  # must not delete b's lease
    assert store.read_json("leases/n.json")["owner"] == "b"
    b.release()


def test_renewal_keeps_a_short_lease_alive(store):
    a = Lease(store, "r", ttl_s=1.0, owner="a", renew_every_s=0.2)
    with a:
        time.sleep(1.5)
        with pytest.raises(LeaseHeld):
            Lease(store, "r", ttl_s=1.0, owner="b").acquire()
    assert not store.exists("leases/r.json")


def test_racing_acquirers_exactly_one_wins(store):
    winners, errors = [], []
    barrier = threading.Barrier(6)

    def contend(i):
        lease = Lease(store, "race", ttl_s=60, owner=f"w{i}")
        barrier.wait()
        try:
            lease.acquire()
            winners.append(i)
        except LeaseHeld:
            pass
        except Exception as err:  # pragma: no cover - shown on failure
            errors.append(err)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(winners) == 1
    assert store.read_json("leases/race.json")["owner"] == f"w{winners[0]}"


def test_moto_honours_conditional_writes(s3_url):
    assert lease_mod._conditional_writes(open_store(s3_url)) is True


def test_write_then_verify_fallback(s3_url, monkeypatch):
    store = open_store(s3_url)
    monkeypatch.setitem(lease_mod._PROBED, store.url, False)
    a = Lease(store, "v", ttl_s=60, owner="a", settle_s=0.05)
    a.acquire()
    with pytest.raises(LeaseHeld):
        Lease(store, "v", ttl_s=60, owner="b", settle_s=0.05).acquire()
    a.release()
