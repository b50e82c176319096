"""The request path: what happens to a request between a client's socket and a PLC's.

Read top to bottom:

``timers``    a clockless timer heap: the core schedules, the driver says what time it is
``plc``       a PLC target's settings (in ``plc_target``), a request's errors, the reply check
``exchange``  one forwarded request and its single outcome
``link``      one PLC connection slot as state: transaction ids, in flight, owed late replies
``target``    one PLC as a state machine: slots, deadlines, resets, reconnects, fairness
``router``    every target by unit id, and the outbox the core writes its wishes to
``client``    one client connection as a state machine: framing, pipelining, deadlines, drain
``decide``    the policy side of a connection: decide, complete, log (the policy is pure)
``epoll``     the driver: one epoll thread moves bytes and timers and decides nothing

Everything but ``epoll`` is sans-IO (no socket, ssl, select, threading, time or trio; a test
checks the imports), so tests drive it with generated fault schedules on a simulated clock.
Imports run one way: core modules never import the driver.
"""
