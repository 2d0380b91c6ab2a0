"""Models: version ids, the resolved spec a replica loads, and the demo model maker."""
