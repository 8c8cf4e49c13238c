"""Flow control: pausing queues, and concurrency and rate limits per job type and queue."""
