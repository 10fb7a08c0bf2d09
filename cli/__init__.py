"""The `crispedit` command line: the composition root over the engine, registry, service and worker."""
