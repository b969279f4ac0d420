"""irishost: run an iris.ServiceHandler on a pool of worker processes.

A plain ``iris.register`` service runs its handlers on threads of one
process, so CPU-bound Python uses one core. irishost forks workers instead,
and keeps the relay connection in one supervisor process::

      relay (TCP, loopback)
        |
    +---+----------------------------------------------------------+
    |   supervisor process                                         |
    |   reader thread --RelayDispatch--> pick worker, write frame  |
    |   main loop: collect replies -> relay; signals; reap,        |
    |              murder stuck, recycle bloated, respawn          |
    +------+---------------------------------------+---------------+
           | ring pair (shared memory, msgpack)    | ring pair
    +------+---------------+              +--------+--------------+
    | worker 0             |              | worker 1              |
    | main thread: inbox   |              | ...                   |
    |  -> HandlerPools     |              |                       |
    |  -> handler threads  |              |                       |
    |  -> outbox           |              |                       |
    | own plain client conn|              |                       |
    | for init()'s outbound|              |                       |
    +----------------------+              +-----------------------+

Who owns what: the supervisor owns the relay connection, the rings (created
before fork, their names unlinked at once, so nothing lingers in /dev/shm)
and the bookkeeping of every request in flight; a worker owns its handler
instance and its pools. A request is answered exactly once: by its worker's
reply, by a fault when no worker has room, or by a fault when its worker
dies; a worker's death fails exactly the work it held. While no worker is
ready at all, requests wait in the supervisor for one (until their deadline).

Modules: ``cli`` (command line), ``config`` (TOML), ``loader`` (handler
import), ``supervisor`` (the loop), ``dispatch`` (relay -> workers),
``workers`` (a worker as the supervisor sees it), ``worker`` (the worker
process), ``ring`` (shared-memory rings), ``frames`` (what crosses them),
``bridge`` / ``worker_tunnel`` (tunnels across the process boundary).
"""
