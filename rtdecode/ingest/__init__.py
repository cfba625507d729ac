"""The ingest stage: scanner export folder -> ordered Volume records and IngestEvent reports.

Entry points: :class:`rtdecode.ingest.pipeline.Ingestor` (the stage) and
:class:`rtdecode.ingest.reader.VolumeReader` (one file at a time). See docs/ingest.md.
"""
