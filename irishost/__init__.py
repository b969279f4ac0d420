"""irishost: run an iris.ServiceHandler on a pool of worker processes.

A plain ``iris.register`` service runs its handlers on threads of one
process, so CPU-bound Python uses one core. irishost forks workers instead,
and keeps the relay connection in one supervisor process::

      relay (TCP, loopback)
        |
    +---+-------------------------------------------------------------+
    |   supervisor process                                            |
    |   RelayLink: the connection, its state, reconnect backoff       |
    |   reader thread --RelayDispatch--> WorkerTable.book, write frame|
    |   Supervisor loop: collect frames -> RelayDispatch.answer       |
    |     (-> RequestLog: metrics, access log); signal queue, from    |
    |     signals and control commands, and its table; reap;          |
    |     WorkerPool murders stuck, recycles bloated, respawns        |
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

Workers are forked by the fork server (``fork_server``), a process the
supervisor starts while it still has one thread; it is their parent, reaps
them and reports their deaths to the supervisor.

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

Modules: ``cli`` (command line), ``config`` (TOML), ``loader`` (handler
import), ``exits`` (exit codes), ``supervisor`` (the loop and the signal
table), ``relay_link`` (the relay connection), ``dispatch`` (relay ->
workers, and every answer), ``worker_table`` (worker records, states,
tickets), ``workers`` (a worker as the supervisor sees it), ``pool`` (spawn,
retire, recycle, kill), ``respawner`` (the respawn and give-up policy),
``rollout`` (reloads and reconnects), ``spawner`` / ``fork_server``
(forking a worker),
``host_status`` (systemd status, snapshots), ``worker`` / ``async_worker``
(the worker process), ``ring`` (shared-memory rings), ``frames`` (what
crosses them), ``request_log`` (each request's outcome: metrics and access
log), ``bridge`` / ``worker_tunnel`` (tunnels across the process
boundary), ``wakeup`` (signals wake a loop), ``control`` / ``metrics`` /
``notify`` (operators and systemd).
"""
