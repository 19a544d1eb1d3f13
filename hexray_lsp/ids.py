"""The ids the server and its clients share, defined once (editor clients name the same strings)."""

RECORD = "hexray.recordTrace"  # [uri]: record the document's current text
CANCEL = "hexray.cancelRecording"  # [uri]: cancel its recording (all recordings without a uri)
RESTART = "hexray.restartWorker"  # stop the worker; the next recording starts a fresh one
STATUS = "hexray.status"  # what the server knows: settings, worker, documents and their traces
COMMANDS = (RECORD, CANCEL, RESTART, STATUS)
SOURCE = "hexray"  # the diagnostics' source
