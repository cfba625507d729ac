"""Deployment: compiled engines per subject (``rtdecode build-engines``, ``verify-engines``, ``bench engines``)
and the service files of ``deploy/systemd``. Imports the runtime only; see docs/deployment.md."""
