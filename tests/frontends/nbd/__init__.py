"""NBD server tests: the sans-io protocol, the glue with a small client, and real clients."""
