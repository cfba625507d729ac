"""Training data sources: the published NSD files, session bundles, the synthetic world (one interface)."""
