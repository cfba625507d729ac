"""The two-host decode link: the scanner side hands trial jobs to decode workers on GPU nodes over ZeroMQ.

The scanner side binds a ROUTER (:class:`rtdecode.remote.dispatcher.Dispatcher`); every decode worker connects a
DEALER (:func:`rtdecode.remote.worker.run_worker`). A worker asks for one job at a time, so jobs go to whichever
worker is free (load balancing). Both sides send heartbeats: a worker that falls silent is declared dead and its
job goes back to the front of the backlog, so a worker dying mid-trial loses nothing; a worker that stops hearing
the dispatcher reconnects and announces itself again. :mod:`rtdecode.remote.wire` defines the frames.
"""
