"""Observability: counters and histograms aggregated in Redis, the scrape, logs, alerts."""
