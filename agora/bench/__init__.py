"""`agora bench …`: measurements that write their numbers to files (never timed tests)."""
