"""irishost: run an iris.ServiceHandler on a pool of worker processes.

A plain ``iris.register`` service runs its handlers on threads of one
process, so CPU-bound Python uses one core. irishost forks workers instead,
and keeps the relay connection in one supervisor process::

      relay (TCP, loopback)
        |
    +---+-------------------------------------------------------------+
    |   supervisor process                                            |
    |   RelayLink: the connection, its state, reconnect backoff       |
    |   reader thread --Switchboard--> WorkerTable.book, write frame  |
    |   Supervisor loop: collect frames -> Switchboard.answer         |
    |     (-> RequestLog: metrics, access log); signal queue, from    |
    |     signals and control commands, and its table; reap;          |
    |     Workforce murders stuck, recycles bloated, respawns         |
    |     (when: Respawner); Rollout for reloads                      |
    |     and reconnects; HostStatus to systemd and `irishost status` |
    |   WorkerTable: worker records, their states, request tickets    |
    +------+------------------------------------------+---------------+
           | ring pair (shared memory, typed frames)  | ring pair
    +------+---------------+              +-----------+-----------+
    | worker 0             |              | worker 1              |
    | main thread: inbox   |              | ...                   |
    |  -> HandlerPools     |              |                       |
    |  -> handler threads  |              |                       |
    |  -> outbox           |              |                       |
    | own plain client conn|              |                       |
    | for init()'s outbound|              |                       |
    +----------------------+              +-----------------------+

Workers are forked by fork servers, never by the supervisor (it has
threads, and ``fork`` copies only the calling thread)::

    supervisor (a child subreaper)
      |-- fork server, generation N    a fresh interpreter (exec), one per
      |     (imports the handler        generation: the start, each reload,
      |      when preloading)           each reconnect; asked for workers
      |                                 over a socket, answers through the
      |                                 supervisor's loop, deadline per call
      |-- worker 0 (generation N)      forked by it through an intermediate
      `-- worker 1 (generation N)      that exits at once: the supervisor is
                                        every worker's parent and reaps it

A fork server that dies, hangs or fails to fork costs a respawn's backoff,
never a worker or the host; a reload whose import fails, exits or crashes
fails only that reload (``irishost.forks.server``, ``supervisor.spawner``).

Who owns what: the supervisor owns the relay connection, the rings (created
by the fork server before the fork, their names unlinked at once, so
nothing lingers in /dev/shm, and passed to the supervisor) and the
bookkeeping of every request in flight (in its WorkerTable); a worker owns
its handler instance and its pools. A request is answered exactly once: by
its worker's reply, by a fault when no worker has room, or by a fault when
its worker dies; a worker's death fails exactly the work it held. While no
worker is ready at all, requests wait in the supervisor for one (until their
deadline). A worker that writes a frame that does not decode is killed as
broken, which is such a death.

A worker ends gracefully only by draining: at stop, when a reload or a
scale-down retires it, when it is recycled, and after a relay drop (its
handler got ``handle_drop``; fresh workers run ``init`` again once the relay
is back). Drained, it runs its handler's ``close()`` and the ``atexit``
callbacks handler code registered, within ``workers.shutdown_timeout``
(``worker/process.py``); a crash or a kill runs neither.

Layout, by layer (each imports only from those below it; checked by
tests/host/test_irishost_layout.py): ``cli`` (command line); ``supervisor/``
(``loop``: the loop and the signal table; ``generations`` and ``rollout``:
reloads, reconnects, scaling; ``spawner``: the fork servers, seen from the
supervisor; ``workforce`` and ``respawner``: spawn, retire, recycle, kill, and
when; ``worker_table`` and ``handle``: worker records, states, tickets;
``switchboard`` (and its ``fastpath``), ``request_log``, ``bridge``: relay -> workers, every answer,
tunnels; ``relay_link``; ``status``); ``forks/`` (``server``: the fork
server process; ``messages``: what crosses to it); ``ops/`` (``control``,
``metrics``, ``notify``: operators and systemd); ``worker/`` (``process``:
the worker; ``loop``: its event loop for iris.aio handlers; ``tunnel``);
``wire/`` (``ring``: shared-memory rings; ``frames``: what crosses them;
``wakeup``: signals wake a loop); and below all, ``config``, ``loader``
(handler import) and ``exits``.
"""
