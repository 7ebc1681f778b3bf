"""One run's driver and the files and sinks it records to."""
