"""Socket accounting and the trusted-proxy rule (stream/limits.py), without a network."""

from __future__ import annotations

from stream.limits import OVER_PER_CLIENT, Admission, SocketLimits, TrustedProxies


def test_every_socket_counts_and_the_limit_is_lowered_to_leave_a_descriptor_margin():
    """With ulimit -n 1024 and fd_margin 100, 924 sockets are served, then answered over capacity,
    then refused outright before the process runs out of descriptors."""
    limits = SocketLimits(max_connections=10_000, per_client=100_000, fd_margin=100, nofile=1024)
    assert (limits.limit, limits.hard) == (924, 974)
    admissions = [limits.opened(object(), f"10.0.{n // 250}.{n % 250}") for n in range(1100)]
    assert admissions[:924] == [Admission.SERVE] * 924
    assert set(admissions[924:974]) == {Admission.OVER}
    assert set(admissions[974:]) == {Admission.REFUSE}
    assert len(limits.open) == 974 and limits.refused["fd_margin"] == 126


def test_per_client_limit_and_the_over_capacity_allowance_per_address():
    """Past its per-address limit an address gets a few over-capacity answers, then its sockets
    are closed at once; other addresses are unaffected, and closing frees the slots."""
    limits = SocketLimits(max_connections=1000, per_client=3, fd_margin=10, nofile=1040)
    assert limits.over_per_client == OVER_PER_CLIENT
    keys = [object() for _ in range(3 + OVER_PER_CLIENT + 2)]
    got = [limits.opened(key, "1.1.1.1") for key in keys]
    assert got == [Admission.SERVE] * 3 + [Admission.OVER] * OVER_PER_CLIENT + [Admission.REFUSE] * 2
    roomy = SocketLimits(max_connections=10_000, per_client=100, fd_margin=100, nofile=20_000)
    assert roomy.over_per_client == (19_950 - 10_000) // 4
    assert limits.opened(object(), "2.2.2.2") is Admission.SERVE
    for key in keys:
        limits.closed(key)
        limits.closed(key)  # idempotent
    assert limits.opened(object(), "1.1.1.1") is Admission.SERVE
    assert limits.per_host["1.1.1.1"] == 1 and "1.1.1.1" not in limits.over_per_host


def test_a_trusted_proxy_is_not_limited_by_its_own_address():
    """Sockets from a trusted proxy are counted in all, not per address."""
    limits = SocketLimits(max_connections=1000, per_client=2, fd_margin=10, nofile=100_000)
    got = [limits.opened(object(), "10.0.0.1", counted_by_address=False) for _ in range(5)]
    assert got == [Admission.SERVE] * 5


def test_forwarded_for_is_believed_only_from_listed_proxies():
    """By default nobody is trusted; a listed proxy names the nearest untrusted hop."""
    nobody = TrustedProxies([])
    assert nobody.client("127.0.0.1", ["203.0.113.9"]) == "127.0.0.1"
    proxy = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
    assert proxy.client("127.0.0.1", ["203.0.113.9, 10.1.2.3"]) == "203.0.113.9"
    assert proxy.client("192.0.2.1", ["203.0.113.9"]) == "192.0.2.1"


def test_a_bucket_charged_past_zero_says_how_long_the_debt_lasts():
    """spend() takes work already done even past the burst and answers the wait until it is repaid."""
    from stream.limits import TokenBucket

    bucket = TokenBucket(rate=100, burst=50, now=0.0)
    assert bucket.spend(0.0, 30) == 0.0
    assert bucket.spend(0.0, 120) == 1.0  # 100 tokens short at 100/s
    assert bucket.spend(1.0, 0) == 0.0 and bucket.tokens == 0
