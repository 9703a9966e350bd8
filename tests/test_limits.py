"""Socket accounting and the trusted-proxy rule (stream/limits.py), without a network."""

from __future__ import annotations

from stream.limits import OVER_PER_CLIENT, Admission, SocketLimits, TrustedProxies


def test_every_socket_counts_and_the_limit_is_lowered_to_leave_a_descriptor_margin():
    """With ulimit -n 1024 and fd_margin 100, 924 sockets are served, then answered over capacity,
    then refused outright before the process runs out of descriptors."""
    limits = SocketLimits(max_connections=10_000, per_client=100_000, fd_margin=100, nofile=1024)
    assert (limits.limit, limits.hard) == (924, 974)
    admissions = [limits.opened(object(), f"10.0.{n // 250}.{n % 250}")[0] for n in range(1100)]
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
    got = [limits.opened(key, "1.1.1.1")[0] for key in keys]
    assert got == [Admission.SERVE] * 3 + [Admission.OVER] * OVER_PER_CLIENT + [Admission.REFUSE] * 2
    roomy = SocketLimits(max_connections=10_000, per_client=100, fd_margin=100, nofile=20_000)
    assert roomy.over_per_client == (19_950 - 10_000) // 4
    assert limits.opened(object(), "2.2.2.2")[0] is Admission.SERVE
    for key in keys:
        limits.closed(key)
        limits.closed(key)  # idempotent
    assert limits.opened(object(), "1.1.1.1")[0] is Admission.SERVE
    assert limits.per_host["1.1.1.1"] == 1 and "1.1.1.1" not in limits.over_per_host


def test_a_trusted_proxy_is_not_limited_by_its_own_address():
    """Sockets from a trusted proxy are counted in all, not per address."""
    limits = SocketLimits(max_connections=1000, per_client=2, fd_margin=10, nofile=100_000)
    got = [limits.opened(object(), "10.0.0.1", counted_by_address=False)[0] for _ in range(5)]
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


def test_ipv6_clients_count_by_their_prefix_and_mapped_ipv4_as_ipv4():
    """One IPv6 client owns a /64: its addresses share one count; ::ffff:a.b.c.d is a.b.c.d."""
    from stream.limits import address_group

    assert address_group("2001:db8:1:2::1", 64) == address_group("2001:db8:1:2:ffff::9", 64) == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1", 64) != address_group("2001:db8:1:2::1", 64)
    assert address_group("2001:db8:1:2::1", 128) == "2001:db8:1:2::1/128"
    assert address_group("::ffff:192.0.2.7", 64) == address_group("192.0.2.7", 64) == "192.0.2.7"
    assert address_group("fe80::1%eth0", 64) == "fe80::/64"
    assert address_group("", 64) == "" and address_group("not an address", 64) == "not an address"


def test_near_the_limit_the_addresses_holding_the_most_are_refused_not_the_newcomers():
    """max_connections 1,000: once 900 sockets are open, an address holding more than 10 gets no
    new one, while addresses holding fewer are still served up to 1,000."""
    limits = SocketLimits(max_connections=1000, per_client=1000, fd_margin=10, nofile=100_000)
    big = [limits.opened(object(), f"10.0.0.{n % 12}")[0] for n in range(900)]
    assert big == [Admission.SERVE] * 900
    assert limits.opened(object(), "10.0.0.1")[0] is Admission.OVER and limits.refused["fair_share"] == 1
    small = [limits.opened(object(), f"192.0.2.{n // 5}")[0] for n in range(99)]  # 5 each: under 1 %
    assert small == [Admission.SERVE] * 99


def test_at_the_descriptor_cap_a_newcomer_takes_the_place_of_the_biggest_holders_idle_socket():
    """At the cap, a socket from an address with few sockets evicts the oldest socket still
    waiting for its first head from an address with more; the address with the most gets none,
    and a socket that sent a head is never evicted."""
    limits = SocketLimits(max_connections=10_000, per_client=10_000, fd_margin=100, nofile=1024)
    attacker = [object() for _ in range(limits.hard)]
    for n, key in enumerate(attacker):
        limits.opened(key, f"203.0.113.{n % 50}")
    assert len(limits.open) == limits.hard
    limits.engaged(attacker[0])  # it sent a request: not evictable
    assert limits.opened(object(), "203.0.113.1") == (Admission.REFUSE, None)
    admission, evicted = limits.opened(object(), "198.51.100.1")  # a health check from elsewhere
    assert admission is not Admission.REFUSE and evicted is attacker[1]
    assert len(limits.open) == limits.hard and attacker[1] not in limits.open
