"""The ``iris`` command: the binding's operations from the shell.

One module per concept: ``cli`` (arguments, exit codes), ``messaging``
(request, broadcast, publish, subscribe, reply), ``pipe`` (tunnel to and
from stdin/stdout), ``bench`` and ``latency`` (load tests and their report),
``keygen`` (the network key of a multi-machine Iris deployment).
"""
