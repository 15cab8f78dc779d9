"""Helpers used by several stages and the tests: atomic files and checksums (`common.files`),
server processes and ports (`common.procs`). Standard library only; the service does not use it
(a bento ships `service/` alone)."""
