"""The shared core of the service and its workers: job records, settings and notifications over Redis."""
