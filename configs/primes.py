"""A deliberately CPU-bound irishost service: counts the primes below n.

It exists to show why irishost runs worker processes instead of threads: pure
Python arithmetic holds the GIL, so only more processes add throughput.
"""

import iris


def count_primes_below(n: int) -> int:
    """Trial division, kept naive on purpose so the work is all in the interpreter."""
    count = 0
    for candidate in range(2, n):
        divisor = 2
        while divisor * divisor <= candidate and candidate % divisor:
            divisor += 1
        if divisor * divisor > candidate:
            count += 1
    return count


class PrimeHandler(iris.ServiceHandler):
    """Request: n as ASCII digits, e.g. b"100000". Reply: the count as ASCII digits.

    ``limit`` comes from the config's ``[settings]`` table: irishost passes its
    keys to the class as keyword arguments. A request above it is refused with
    a fault rather than holding a worker for minutes.
    """

    def __init__(self, limit: int = 10_000_000):
        self.limit = limit

    def handle_request(self, request: bytes) -> bytes:
        n = int(request.decode("ascii"))
        if n > self.limit:
            raise ValueError(f"n is {n}, above this service's limit of {self.limit}")
        return str(count_primes_below(n)).encode("ascii")
