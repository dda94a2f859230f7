"""Where a job runs: the Ray session, the process's lifetime, the console.

In:  the job's `RayConfig`, signals, the terminal.
Out: an embedded or joined Ray (`session`), processes that die with the driver and SIGTERM as Ctrl-C
     (`lifetime`), a quiet console with a progress bar (`console`), checks answered before any work (`preflight`).
"""
