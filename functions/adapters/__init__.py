"""Mode 2 on a replica: user adapters around the shared core, many users per core batch."""
