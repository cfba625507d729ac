"""The operator display: ``rtdecode view`` subscribes to the daemon's stream (docs/protocol.md) and shows it.

* ``state``: :class:`~rtdecode.view.state.DisplayState` turns the stream of protocol messages into what the
  operator needs (latest reconstruction, the run's gallery, motion trace, per-stage latency, problems, health).
* ``server``: :class:`~rtdecode.view.server.ViewServer` serves the page (``static/``: plain HTML, JS and CSS,
  nothing fetched from the internet), the state as JSON and Server-Sent Events, and the images;
  :class:`~rtdecode.view.server.Bridge` runs the ZeroMQ subscriber (late join included) in a thread.
* ``save``: :class:`~rtdecode.view.save.Saver` writes what arrives to a folder (``--save DIR``, headless use).
* ``cli``: the ``view`` command.

Nothing here imports torch; the page works offline.
"""
